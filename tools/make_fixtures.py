#!/usr/bin/env python3
"""Reference fixtures for fisher-stein: tiny random HF models + float64 Fisher matrices.

Run from the repository root:  /root/.venvs/fisher-stein-ref/bin/python tools/make_fixtures.py
Writes tests/fixtures/NAME/{config.json, model.safetensors, reference.safetensors} for every
fixture below and tests/fixtures/VERSIONS.json. Everything is seeded; reruns give identical
bytes (VERSIONS.json carries a date and therefore differs).

Conventions (L = number of blocks, T = sequence length, V = vocab, d = hidden size):
  * Split layer k = 0..L. The layer-k activation H_k [T, d] is the residual stream:
      k = 0: embedding output (GPT-2: wte[x] + wpe[pos]; Llama: embed_tokens[x]);
      k = i: output of block i-1;   k = L: output of the last block, BEFORE the final norm.
    (transformers 5.x output_hidden_states[L] is norm_f(H_L); hidden states here come from
    forward hooks on the embedding / block modules instead.)
  * logits Z [T, V]: plain forward of the saved f32 weights cast to float64 (model.double()).
  * p = softmax(Z[t]).  J = dZ[t]/dh [V, d], h = H_k[t], every other row of H_k held fixed
    (a forward hook on the layer-k module substitutes h into row t; the FULL model runs over the
    full sequence, no KV cache).  Obtained with torch.autograd.functional.jacobian.
  * fisher[k, i]  = F = J^T (diag p - p p^T) J   at t = positions[i]
    (computed as B^T B with B = diag(sqrt p) (J - 1 m^T), m = J^T p; asserted equal to the
    two-term form, then symmetrised exactly).
  * score g_y = d log p_y / dh = J^T (e_y - p).
  * sample_tokens[i, s] = y_s ~ p(. | positions[i]), i.i.d., torch.multinomial with replacement
    on the float64 probs, torch.Generator seeded with the fixture's sample seed; the same tokens
    are used at every layer.
  * sampled_fisher[k, i] = (1/S) sum_s g_{y_s} g_{y_s}^T, g from an independent backward of
    log_softmax(Z[t])[y_s] (asserted equal to J^T (e_y - p)), S = 16, then symmetrised.
  * Float64 caveat: stock transformers Llama code computes RMSNorm, RoPE cos/sin and the eager
    attention softmax in float32 even for a float64 model.  This script patches those three
    spots (class/module level) so the reference is float64 throughout; RoPE inverse
    frequencies (default and "llama3") are recomputed in float64 from config.json.
  * Weights (ours, not transformers' init): every matrix / embedding ~ N(0, std^2) with
    std = initializer_range of the fixture, except the projections that write into the
    residual stream (GPT-2 attn/mlp c_proj, Llama o_proj/down_proj): N(0, std^2 / fan_in);
    every norm weight 1 + 0.3 N(0,1); every bias 0.1 N(0,1). Parameters are visited in
    named_parameters() order (tied weights once) with one seeded torch.Generator.
"""
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama as ml  # noqa: E402

S = 16
NORM_W_SCALE, BIAS_SCALE = 0.3, 0.1
RESIDUAL_OUT = ("attn.c_proj.weight", "mlp.c_proj.weight", "o_proj.weight", "down_proj.weight")
FIXTURES = [
    dict(name="gpt2-tiny-a", arch="gpt2", T=10, positions=[0, 2, 5, 9], seed=1001,
         cfg=dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.4)),
    dict(name="gpt2-tiny-b", arch="gpt2", T=16, positions=[0, 1, 8, 15], seed=1002,
         cfg=dict(n_layer=3, n_head=4, n_embd=48, vocab_size=256, n_positions=64,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.4)),
    dict(name="llama-tiny-tied", arch="llama", T=12, positions=[0, 2, 6, 11], seed=1003,
         cfg=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=64, vocab_size=97, rope_theta=10000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=64,
                  initializer_range=0.4)),
    dict(name="llama-tiny-untied", arch="llama", T=16, positions=[0, 1, 8, 15], seed=1004,
         cfg=dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  hidden_size=48, intermediate_size=96, vocab_size=211, rope_theta=500000.0,
                  tie_word_embeddings=False, attention_bias=True, max_position_embeddings=2048,
                  # original_max 256 (not 16) so that head_dim 8 / theta 5e5 hits all three llama3
                  # branches: wavelength 6.3 kept, 167 smoothed, 4443 and 1.2e5 divided by 8
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=256),
                  initializer_range=0.3)),
]


# ---------------------------------------------------------------- float64 patches for Llama
def _rms_norm_forward(self, x):
    dt = torch.promote_types(x.dtype, torch.float32)  # f32 stays stock, f64 stays f64
    y = x.to(dt)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * y.to(x.dtype)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    key, value = ml.repeat_kv(key, module.num_key_value_groups), ml.repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def rope_inv_freq_f64(cfg):
    """RoPE inverse frequencies in float64 from the config (default or llama3 rope_type)."""
    rp = cfg.rope_parameters
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rp.get("rope_type", "default") == "default":
        return inv
    assert rp["rope_type"] == "llama3", rp
    f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * out / f + smooth * out, out)


def _rope_forward(self, x, position_ids):
    if x.dtype != torch.float64:
        return _STOCK_ROPE(self, x, position_ids)
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq_f64
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


_STOCK_ROPE = ml.LlamaRotaryEmbedding.forward


def patch_llama_float64():
    """For float32 inputs the patched code computes exactly what stock transformers does."""
    ml.LlamaRMSNorm.forward = _rms_norm_forward
    ml.eager_attention_forward = _eager_attention
    ml.LlamaRotaryEmbedding.forward = _rope_forward


# ---------------------------------------------------------------- model construction
def build(spec):
    if spec["arch"] == "gpt2":
        v = spec["cfg"]["vocab_size"]
        cfg = GPT2Config(**spec["cfg"], bos_token_id=v - 1, eos_token_id=v - 1)
        model = GPT2LMHeadModel(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**spec["cfg"]))
    gen = torch.Generator().manual_seed(spec["seed"])
    std = spec["cfg"]["initializer_range"]
    with torch.no_grad():
        for name, prm in model.named_parameters():
            z = torch.randn(prm.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                prm.copy_(BIAS_SCALE * z)
            elif prm.dim() == 1:  # LayerNorm / RMSNorm weight
                prm.copy_(1.0 + NORM_W_SCALE * z)
            elif name.endswith(RESIDUAL_OUT):  # writes into the residual stream: keep growth moderate
                fan_in = prm.shape[0] if isinstance(model, GPT2LMHeadModel) else prm.shape[1]  # Conv1D [in,out]
                prm.copy_(std / math.sqrt(fan_in) * z)
            else:
                prm.copy_(std * z)
    return model.eval()


def layer_modules(model):
    """Modules whose output is the layer-k residual stream, k = 0..L."""
    if isinstance(model, GPT2LMHeadModel):
        return [model.transformer.drop] + list(model.transformer.h)
    return [model.model.embed_tokens] + list(model.model.layers)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with(o, new):
    return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new


def capture_hidden(model, ids):
    store, hooks = {}, []
    for k, mod in enumerate(layer_modules(model)):
        hooks.append(mod.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(k, _out(o).detach().clone())))
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    for h in hooks:
        h.remove()
    return torch.stack([store[k][0] for k in range(len(store))]), out


def logits_with_h(model, ids, k, t, h):
    """Full-sequence logits[t] with row t of the layer-k activation replaced by h."""
    def hook(m, i, o):
        x = _out(o)
        return _with(o, torch.cat([x[:, :t], h[None, None].to(x.dtype), x[:, t + 1:]], dim=1))
    handle = layer_modules(model)[k].register_forward_hook(hook)
    try:
        return model(ids[None], use_cache=False).logits[0, t]
    finally:
        handle.remove()


def score(model, ids, k, t, h0, y):
    h = h0.clone().requires_grad_(True)
    lp = torch.log_softmax(logits_with_h(model, ids, k, t, h), -1)[y]
    return torch.autograd.grad(lp, h)[0]


def fisher_from_J(J, p):
    m = J.T @ p
    B = p.sqrt()[:, None] * (J - m[None])
    F = B.T @ B
    F2 = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    assert rel(F, F2) < 1e-10, rel(F, F2)
    return F


def rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


def check_fisher(F):
    assert rel(F, F.T) < 1e-12, f"asymmetry {rel(F, F.T)}"
    Fs = 0.5 * (F + F.T)
    lmin = float(torch.linalg.eigvalsh(Fs).min())
    assert lmin >= -1e-10 * float(torch.trace(Fs)), f"not PSD: {lmin}"
    return Fs


# ---------------------------------------------------------------- one fixture
def make_fixture(spec, root):
    name, T, pos = spec["name"], spec["T"], spec["positions"]
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    model = build(spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    cfg = model.config
    V, d, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(spec["seed"] + 100))

    with torch.no_grad():
        logits_f32 = model(ids[None]).logits[0].double()  # stock f32 forward, for the record
    model = model.double()
    if spec["arch"] == "llama":
        re = model.model.rotary_emb
        re.inv_freq_f64 = rope_inv_freq_f64(cfg)
        assert rel(re.inv_freq.double(), re.inv_freq_f64) < 1e-6, (re.inv_freq, re.inv_freq_f64)
    hidden, out = capture_hidden(model, ids)
    logits = out.logits[0].detach()
    probs = torch.softmax(logits, -1)
    print(f"[{name}] |logits(f64) - logits(stock f32)|_max = {float((logits - logits_f32).abs().max()):.2e}")

    # ---- hidden-state conventions
    if spec["arch"] == "gpt2":
        tr = model.transformer
        h0 = tr.wte.weight[ids] + tr.wpe.weight[:T]
        final_norm, emb_in = tr.ln_f, tr.wte.weight[ids]
    else:
        h0, final_norm = model.model.embed_tokens.weight[ids], model.model.norm
        emb_in = h0
    with torch.no_grad():
        assert rel(hidden[0], h0) < 1e-15
        assert rel(model.lm_head(final_norm(hidden[L])), logits) < 1e-14  # upper part from H_L
        assert rel(model(inputs_embeds=emb_in[None]).logits[0], logits) < 1e-14  # from H_0
        hs = out.hidden_states
        for k in range(L):
            assert rel(hs[k][0], hidden[k]) < 1e-15, k
        last_is_normed = rel(hs[L][0], final_norm(hidden[L])) < 1e-14
        print(f"[{name}] output_hidden_states[L] == norm_f(H_L): {last_is_normed}; "
              f"== H_L: {rel(hs[L][0], hidden[L]) < 1e-14}")

    print(f"[{name}] rms of H_k, k=0..L: {[f'{x:.3g}' for x in hidden.pow(2).mean((1, 2)).sqrt().tolist()]}")
    ent = -(probs * probs.log()).sum(-1)
    print(f"[{name}] entropy over positions: min {float(ent.min()):.3f} max {float(ent.max()):.3f} "
          f"(log V = {math.log(V):.3f}); max p range {float(probs.max(-1).values.min()):.3f}.."
          f"{float(probs.max(-1).values.max()):.3f}")
    assert 0.1 < float(ent.min()) and float(ent.max()) < 0.95 * math.log(V)

    gen = torch.Generator().manual_seed(spec["seed"] + 200)
    samples = torch.stack([torch.multinomial(probs[t], S, replacement=True, generator=gen) for t in pos])

    P = len(pos)
    fisher = torch.zeros(L + 1, P, d, d, dtype=torch.float64)
    sampled = torch.zeros_like(fisher)
    for k in range(L + 1):
        for i, t in enumerate(pos):
            h0_kt = hidden[k, t].clone()
            with torch.no_grad():
                assert torch.equal(logits_with_h(model, ids, k, t, h0_kt), logits[t])  # hooked == plain
            J = torch.autograd.functional.jacobian(lambda h: logits_with_h(model, ids, k, t, h), h0_kt,
                                                   vectorize=True)
            p = probs[t]
            fisher[k, i] = check_fisher(fisher_from_J(J, p))
            G = torch.stack([score(model, ids, k, t, h0_kt, int(y)) for y in samples[i]])
            G_J = torch.stack([J.T @ (torch.nn.functional.one_hot(y, V).double() - p) for y in samples[i]])
            assert rel(G, G_J) < 1e-12, rel(G, G_J)
            sampled[k, i] = check_fisher(G.T @ G / S)
            if (k, i) in [(0, 0), (L, P - 1), (L // 2 + 1, P // 2)]:  # full score-path check
                Gall = torch.stack([score(model, ids, k, t, h0_kt, y) for y in range(V)])
                F_score = (Gall * p[:, None]).T @ Gall
                assert rel(F_score, fisher[k, i]) < 1e-11, rel(F_score, fisher[k, i])
                eps, E = 1e-5, torch.eye(d, dtype=torch.float64)  # central differences, no autograd
                with torch.no_grad():
                    J_fd = torch.stack([(logits_with_h(model, ids, k, t, h0_kt + eps * E[j])
                                         - logits_with_h(model, ids, k, t, h0_kt - eps * E[j])) / (2 * eps)
                                        for j in range(d)], dim=1)
                assert rel(J_fd, J) < 1e-7, rel(J_fd, J)
    norms = fisher.flatten(2).norm(dim=-1)
    for k in range(L + 1):
        tr = torch.diagonal(fisher[k], dim1=-2, dim2=-1).sum(-1)
        print(f"[{name}] layer {k}: ||F||_F per position {[f'{x:.3g}' for x in norms[k].tolist()]}, "
              f"trace {[f'{x:.3g}' for x in tr.tolist()]}, ||F_S||_F "
              f"{[f'{x:.3g}' for x in sampled[k].flatten(1).norm(dim=-1).tolist()]}")

    ref = dict(input_ids=ids, logits=logits, hidden=hidden, positions=torch.tensor(pos, dtype=torch.int64),
               fisher=fisher, sample_tokens=samples, sampled_fisher=sampled)
    save_file({k: v.detach().contiguous() for k, v in ref.items()}, str(out_dir / "reference.safetensors"))
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    if spec["arch"] == "gpt2":
        assert all(k.startswith("transformer.") for k in keys) and "lm_head.weight" not in keys, keys
        assert not any(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in keys)
        assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (d, 3 * d)  # Conv1D [in, out]
    else:
        assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings), keys
    print(f"[{name}] checkpoint keys: {len(keys)}; non-layer keys: "
          f"{[k for k in keys if '.h.' not in k and '.layers.' not in k]}")
    return dict(seed=spec["seed"], input_ids_seed=spec["seed"] + 100, sample_seed=spec["seed"] + 200,
                T=T, positions=pos, S=S, initializer_range=spec["cfg"]["initializer_range"])


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    patch_llama_float64()
    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    seeds = {spec["name"]: make_fixture(spec, root) for spec in FIXTURES}
    versions = dict(script="tools/make_fixtures.py", python=platform.python_version(),
                    torch=torch.__version__, transformers=transformers.__version__,
                    safetensors=safetensors.__version__, numpy=np.__version__,
                    norm_weight_scale=NORM_W_SCALE, bias_scale=BIAS_SCALE,
                    date=datetime.date.today().isoformat(), fixtures=seeds)
    (root / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"total fixture size: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
