#!/usr/bin/env python3
"""Reference fixtures for fisher-stein: tiny random HF models + float64 Fisher matrices.

Run from the repository root:  /root/.venvs/fisher-stein-ref/bin/python tools/make_fixtures.py
Writes tests/fixtures/NAME/{config.json, model.safetensors, reference.safetensors} for every
fixture below (plus model.gguf for the families llama.cpp converts, see write_gguf) and
tests/fixtures/VERSIONS.json. Everything is seeded; reruns give identical bytes (VERSIONS.json
carries a date and therefore differs).
Options: --only NAME[,NAME..] (those fixtures only, VERSIONS.json untouched);
         --probe (build and print the statistics only: no Fisher loop, nothing written).

Families: GPT-2, Llama, Gemma-2, Gemma-3 (text), Qwen3, GPT-NeoX (parallel and sequential
residual), Phi-3, OLMo-2, Mistral; each through transformers' own classes, eager attention.

Conventions (L = number of blocks, T = sequence length, V = vocab, d = hidden size):
  * Split layer k = 0..L. The layer-k activation H_k [T, d] is the residual stream:
      k = 0: embedding output (GPT-2: wte[x] + wpe[pos]; Gemma: embed_tokens[x] * sqrt(d);
             all others: the embedding row);
      k = i: output of block i-1;   k = L: output of the last block, BEFORE the final norm.
    (transformers 5.x output_hidden_states[L] is norm_f(H_L); hidden states here come from
    forward hooks on the embedding / block modules instead.)
  * logits Z [T, V]: plain forward of the saved f32 weights cast to float64 (model.double()),
    including Gemma-2's final logit soft-capping.
  * positions = all of 0..T-1.
  * p = softmax(Z[t]).  J = dZ[t]/dh [V, d], h = H_k[t], every other row of H_k held fixed
    (a forward hook on the layer-k module substitutes h into row t; the FULL model runs over the
    full sequence, no KV cache).  Obtained with torch.autograd.functional.jacobian.
  * fisher[k, t]  = F = J^T (diag p - p p^T) J
    (computed as B^T B with B = diag(sqrt p) (J - 1 m^T), m = J^T p; asserted equal to the
    two-term form, then symmetrised exactly).
  * score g_y = d log p_y / dh = J^T (e_y - p).
  * sample_tokens[t, s] = y_s ~ p(. | t), i.i.d., torch.multinomial with replacement on the
    float64 probs, torch.Generator seeded with the fixture's sample seed; the same tokens are
    used at every layer.
  * sampled_fisher[k, t] = (1/S) sum_s g_{y_s} g_{y_s}^T, g from an independent backward of
    log_softmax(Z[t])[y_s] (asserted equal to J^T (e_y - p)), S = 16, then symmetrised.
  * Float64 caveat: stock transformers code computes RMSNorm (all variants incl. Gemma's
    x*(1+w)), RoPE cos/sin and the eager attention softmax in float32 even for a float64 model
    (and Gemma's sqrt(d) embedding scale is a float32 buffer).  This script patches those spots
    (class/module level) so that float64 inputs are computed in float64 and float32 inputs take
    the stock code path; RoPE inverse frequencies (default, linear, llama3; partial rotary) are
    recomputed in float64 from config.json.
  * Weights (ours, not transformers' init): every matrix / embedding ~ N(0, std^2) with
    std = initializer_range of the fixture, except the projections that write into the
    residual stream (GPT-2 attn/mlp c_proj, o_proj/down_proj, GPT-NeoX attention.dense /
    mlp.dense_4h_to_h): N(0, std^2 / fan_in); every norm weight 1 + 0.3 N(0,1) (Gemma RMSNorm,
    which computes x*(1+w): w = 0.3 N(0,1)); every bias 0.1 N(0,1). Parameters are visited in
    named_parameters() order (tied weights once) with one seeded torch.Generator.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
    GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.olmo2 import modeling_olmo2  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

S = 16
NORM_W_SCALE, BIAS_SCALE = 0.3, 0.1
RESIDUAL_OUT = ("attn.c_proj.weight", "mlp.c_proj.weight", "o_proj.weight", "down_proj.weight",
                "attention.dense.weight", "mlp.dense_4h_to_h.weight")
GEMMA = ("gemma2", "gemma3")  # RMSNorm computes x * (1 + w); embedding scaled by sqrt(d)
# arch -> (config class, model class, modelling module (for the float64 patches), RMSNorm class)
FAMILIES = {
    "gpt2": (GPT2Config, GPT2LMHeadModel, None, None),
    "llama": (LlamaConfig, LlamaForCausalLM, modeling_llama, "LlamaRMSNorm"),
    "mistral": (MistralConfig, MistralForCausalLM, modeling_mistral, "MistralRMSNorm"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, modeling_qwen3, "Qwen3RMSNorm"),
    "phi3": (Phi3Config, Phi3ForCausalLM, modeling_phi3, "Phi3RMSNorm"),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, modeling_olmo2, "Olmo2RMSNorm"),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, modeling_gemma2, "Gemma2RMSNorm"),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, modeling_gemma3, "Gemma3RMSNorm"),
    "gptneox": (GPTNeoXConfig, GPTNeoXForCausalLM, modeling_gpt_neox, None),  # nn.LayerNorm
}
ROTARY = {"llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding", "qwen3": "Qwen3RotaryEmbedding",
          "phi3": "Phi3RotaryEmbedding", "olmo2": "Olmo2RotaryEmbedding", "gemma2": "Gemma2RotaryEmbedding",
          "gemma3": "Gemma3RotaryEmbedding", "gptneox": "GPTNeoXRotaryEmbedding"}


def _ids(v):  # bos = eos = V-1, no pad (the families' defaults are out of range for tiny vocabularies)
    return dict(bos_token_id=v - 1, eos_token_id=v - 1, pad_token_id=None)


FIXTURES = [
    # ---- the original four (seeds/configs unchanged: their checkpoints stay byte-identical)
    dict(name="gpt2-tiny-a", arch="gpt2", T=10, seed=1001,
         cfg=dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.4)),
    dict(name="gpt2-tiny-b", arch="gpt2", T=16, seed=1002,
         cfg=dict(n_layer=3, n_head=4, n_embd=48, vocab_size=256, n_positions=64,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new", initializer_range=0.4)),
    dict(name="llama-tiny-tied", arch="llama", T=12, seed=1003,
         cfg=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=64, vocab_size=97, rope_theta=10000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=64,
                  initializer_range=0.4)),
    dict(name="llama-tiny-untied", arch="llama", T=16, seed=1004,
         cfg=dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  hidden_size=48, intermediate_size=96, vocab_size=211, rope_theta=500000.0,
                  tie_word_embeddings=False, attention_bias=True, max_position_embeddings=2048,
                  # original_max 256 (not 16) so that head_dim 8 / theta 5e5 hits all three llama3
                  # branches: wavelength 6.3 kept, 167 smoothed, 4443 and 1.2e5 divided by 8
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=256),
                  initializer_range=0.3)),
    # ---- other families
    dict(name="gemma2-tiny", arch="gemma2", T=12, seed=1005,
         cfg=dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=64, vocab_size=150, sliding_window=4,
                  query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                  attn_logit_softcapping=10.0, final_logit_softcapping=10.0, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, max_position_embeddings=64, rope_theta=10000.0,
                  initializer_range=0.4, **_ids(150))),
    dict(name="gemma3-tiny", arch="gemma3", T=14, seed=1006,
         cfg=dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=64, vocab_size=140, sliding_window=5,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                  query_pre_attn_scalar=20, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                  rms_norm_eps=1e-6, max_position_embeddings=128,
                  rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
                                   "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
                  initializer_range=0.4, **_ids(140))),
    dict(name="qwen3-tiny", arch="qwen3", T=12, seed=1007,
         cfg=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=12, intermediate_size=64, vocab_size=130, tie_word_embeddings=True,
                  attention_bias=False, rms_norm_eps=1e-6, max_position_embeddings=64,
                  rope_theta=1000000.0, initializer_range=0.4, **_ids(130))),
    dict(name="pythia-tiny", arch="gptneox", T=12, seed=1008,
         cfg=dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=128,
                  vocab_size=120, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                  hidden_act="gelu", attention_bias=True, tie_word_embeddings=False, layer_norm_eps=1e-5,
                  max_position_embeddings=64, initializer_range=0.4, **_ids(120))),
    dict(name="gptneox-sequential-tiny", arch="gptneox", T=10, seed=1009,
         cfg=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128,
                  vocab_size=110, rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=False,
                  hidden_act="gelu_new", attention_bias=True, tie_word_embeddings=False,
                  layer_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.4, **_ids(110))),
    dict(name="phi3-tiny", arch="phi3", T=12, seed=1010,
         cfg=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=125, sliding_window=5, partial_rotary_factor=0.5,
                  rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  max_position_embeddings=64, original_max_position_embeddings=64,
                  initializer_range=0.4, **_ids(125))),
    dict(name="olmo2-tiny", arch="olmo2", T=12, seed=1011,
         cfg=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=135, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=64, initializer_range=0.4, **_ids(135))),
    dict(name="mistral-window-tiny", arch="mistral", T=12, seed=1012,
         cfg=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, vocab_size=115, sliding_window=4,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=64, initializer_range=0.4, **_ids(115))),
]


# ---------------------------------------------------------------- float64 patches
# Every patched function hands float32 inputs to the stock code unchanged; only float64 inputs take
# the float64 path below.
STATS = {}  # filled by the float64 attention while a fixture records its soft-capping statistics


def _patch_rmsnorm(cls, gemma):
    stock = cls.forward

    def forward(self, x):
        if x.dtype != torch.float64:
            return stock(self, x)
        eps = self.eps if gemma else self.variance_epsilon
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (1.0 + self.weight) if gemma else self.weight * y

    cls.forward = forward


def _patch_rope(cls):
    stock = cls.forward

    def forward(self, x, position_ids, *layer_type):
        if x.dtype != torch.float64:
            return stock(self, x, position_ids, *layer_type)
        inv = self.inv_freq_f64[layer_type[0]] if layer_type else self.inv_freq_f64
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()  # attention_scaling is 1 for default / linear / llama3 (asserted)

    cls.forward = forward


def _eager_f64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
    n_rep = getattr(module, "num_key_value_groups", 1)  # GPT-NeoX: MHA, no attribute
    if n_rep > 1:  # repeat_kv: query head j uses kv head j // n_rep
        b, kv, s, dh = key.shape
        key = key[:, :, None].expand(b, kv, n_rep, s, dh).reshape(b, kv * n_rep, s, dh)
        value = value[:, :, None].expand(b, kv, n_rep, s, dh).reshape(b, kv * n_rep, s, dh)
    if scaling is None:
        scaling = module.head_dim ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        if "attn" in STATS:
            seen = attention_mask == 0 if attention_mask is not None else torch.ones_like(w, dtype=torch.bool)
            STATS["attn"] = max(STATS["attn"], float((w.abs() / softcap)[seen.expand_as(w)].max()))
        w = w / softcap
        w = torch.tanh(w)
        w = w * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def _patch_eager(mod):
    stock = mod.eager_attention_forward

    def eager(module, query, key, value, attention_mask, *args, **kw):
        if query.dtype != torch.float64:
            return stock(module, query, key, value, attention_mask, *args, **kw)
        assert not args, "positional extras"
        return _eager_f64(module, query, key, value, attention_mask, **kw)

    mod.eager_attention_forward = eager


def patch_float64():
    """For float32 inputs the patched code computes exactly what stock transformers does."""
    for arch, (_, _, mod, norm) in FAMILIES.items():
        if mod is None:
            continue  # GPT-2: eager attention and LayerNorm are float64-clean
        if norm is not None:
            _patch_rmsnorm(getattr(mod, norm), arch in GEMMA)
        _patch_rope(getattr(mod, ROTARY[arch]))
        _patch_eager(mod)


def rope_inv_freq_f64(rp, head_dim):
    """RoPE inverse frequencies in float64 from one rope_parameters dict (default, linear, llama3)."""
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rp["factor"]
    assert kind == "llama3", rp
    f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * out / f + smooth * out, out)


def head_dim_of(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ---------------------------------------------------------------- model construction
def build(spec):
    arch = spec["arch"]
    cfg_cls, model_cls = FAMILIES[arch][:2]
    if arch == "gpt2":
        v = spec["cfg"]["vocab_size"]
        cfg = GPT2Config(**spec["cfg"], bos_token_id=v - 1, eos_token_id=v - 1, attn_implementation="eager")
    else:
        cfg = cfg_cls(**spec["cfg"], attn_implementation="eager")
    model = model_cls(cfg)
    assert model.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(spec["seed"])
    std = spec["cfg"]["initializer_range"]
    with torch.no_grad():
        for name, prm in model.named_parameters():
            z = torch.randn(prm.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                prm.copy_(BIAS_SCALE * z)
            elif prm.dim() == 1:  # LayerNorm / RMSNorm weight (Gemma: x * (1 + w), effective weight 1 + w)
                prm.copy_((0.0 if arch in GEMMA else 1.0) + NORM_W_SCALE * z)
            elif name.endswith(RESIDUAL_OUT):  # writes into the residual stream: keep growth moderate
                fan_in = prm.shape[0] if arch == "gpt2" else prm.shape[1]  # GPT-2 Conv1D [in, out]
                prm.copy_(std / math.sqrt(fan_in) * z)
            else:
                prm.copy_(std * z)
    return model.eval()


def base(model):
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox
    return model.model


def layer_modules(model):
    """Modules whose output is the layer-k residual stream, k = 0..L."""
    if isinstance(model, GPT2LMHeadModel):
        return [model.transformer.drop] + list(model.transformer.h)
    if isinstance(model, GPTNeoXForCausalLM):
        return [model.gpt_neox.embed_in] + list(model.gpt_neox.layers)
    return [model.model.embed_tokens] + list(model.model.layers)


def final_norm(model):
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.ln_f
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox.final_layer_norm
    return model.model.norm


def upper(model, h):
    """logits from H_L: lm_head(norm_f(h)), then Gemma-2's final soft-capping (as the model does)."""
    z = model.lm_head(final_norm(model)(h))
    c = getattr(model.config, "final_logit_softcapping", None)
    return z if c is None else torch.tanh(z / c) * c


def sliding_layers(model):
    """Per block: the sliding window W, or None for full causal attention."""
    cfg, L = model.config, model.config.num_hidden_layers
    W = getattr(cfg, "sliding_window", None)
    if isinstance(model, (MistralForCausalLM, Phi3ForCausalLM)):
        return [W] * L  # one window for every layer (config.sliding_window, None = none)
    lt = getattr(cfg, "layer_types", None)
    if lt is None:
        return [None] * L
    return [W if t == "sliding_attention" else None for t in lt]


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with(o, new):
    return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new


def capture_hidden(model, ids):
    store, hooks = {}, []
    for k, mod in enumerate(layer_modules(model)):
        hooks.append(mod.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(k, _out(o).detach().clone())))
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True, output_attentions=True)
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


def to_float64(model):
    """model.double() plus the float64 versions of the float32 constants transformers keeps."""
    model = model.double()
    cfg, arch = model.config, None
    for a, (_, mcls, _, _) in FAMILIES.items():
        arch = a if isinstance(model, mcls) else arch
    if arch in GEMMA:  # embed_scale is a float32 buffer holding sqrt(d); .double() keeps its rounding
        emb = model.model.embed_tokens
        assert abs(float(emb.embed_scale) - math.sqrt(cfg.hidden_size)) < 1e-6
        emb.embed_scale = torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float64)
    if arch in ROTARY:
        re, hd = base(model).rotary_emb, head_dim_of(cfg)
        if arch == "gemma3":  # one set of frequencies per layer type
            re.inv_freq_f64 = {lt: rope_inv_freq_f64(cfg.rope_parameters[lt], hd) for lt in re.layer_types}
            for lt in re.layer_types:
                assert getattr(re, f"{lt}_attention_scaling") == 1.0
                assert rel(getattr(re, f"{lt}_inv_freq").double(), re.inv_freq_f64[lt]) < 1e-6, lt
        else:
            re.inv_freq_f64 = rope_inv_freq_f64(cfg.rope_parameters, hd)
            assert re.attention_scaling == 1.0
            assert rel(re.inv_freq.double(), re.inv_freq_f64) < 1e-6, (re.inv_freq, re.inv_freq_f64)
    return model, arch


# ---------------------------------------------------------------- one fixture
def make_fixture(spec, root, probe=False):
    name, T = spec["name"], spec["T"]
    pos = list(range(T))
    out_dir = root / name
    torch.manual_seed(spec["seed"])
    model = build(spec)
    if not probe:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "generation_config.json").unlink(missing_ok=True)
    cfg = model.config
    V, d, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(spec["seed"] + 100))

    with torch.no_grad():
        logits_f32 = model(ids[None]).logits[0].double()  # stock f32 forward, for the record
    model, arch = to_float64(model)
    STATS.clear()
    STATS["attn"] = 0.0
    hidden, out = capture_hidden(model, ids)
    attn_cap = STATS.pop("attn")
    logits = out.logits[0].detach()
    probs = torch.softmax(logits, -1)
    print(f"[{name}] |logits(f64) - logits(stock f32)|_max = {float((logits - logits_f32).abs().max()):.2e}")

    # ---- hidden-state conventions
    if arch == "gpt2":
        tr = model.transformer
        h0, emb_in = tr.wte.weight[ids] + tr.wpe.weight[:T], tr.wte.weight[ids]
    elif arch == "gptneox":
        h0 = emb_in = model.gpt_neox.embed_in.weight[ids]
    elif arch in GEMMA:
        h0 = emb_in = model.model.embed_tokens.weight[ids] * math.sqrt(d)
    else:
        h0 = emb_in = model.model.embed_tokens.weight[ids]
    with torch.no_grad():
        assert rel(hidden[0], h0) < 1e-15
        assert rel(upper(model, hidden[L]), logits) < 1e-14  # upper part from H_L
        assert rel(model(inputs_embeds=emb_in[None]).logits[0], logits) < 1e-14  # from H_0
        hs = out.hidden_states
        for k in range(L):
            assert rel(hs[k][0], hidden[k]) < 1e-15, k
        last_is_normed = rel(hs[L][0], final_norm(model)(hidden[L])) < 1e-14
        print(f"[{name}] output_hidden_states[L] == norm_f(H_L): {last_is_normed}; "
              f"== H_L: {rel(hs[L][0], hidden[L]) < 1e-14}")
        # attention pattern: query i sees key j iff 0 <= i - j (< W on sliding layers); masked weights are 0
        windows = sliding_layers(model)
        ii, jj = torch.arange(T)[:, None], torch.arange(T)[None, :]
        for layer, (a, W) in enumerate(zip(out.attentions, windows)):
            seen = (ii - jj >= 0) & ((ii - jj < W) if W is not None else True)
            assert torch.equal(a[0] != 0, seen.expand_as(a[0])), (name, layer, W)
        print(f"[{name}] attention windows per block (None = full causal, checked on the weights): {windows}")
        c_final = getattr(cfg, "final_logit_softcapping", None)
        if c_final is not None or attn_cap:
            pre = model.lm_head(final_norm(model)(hidden[L]))
            print(f"[{name}] soft-capping: max |attention score|/c = {attn_cap:.3f} (c = "
                  f"{cfg.attn_logit_softcapping}), max |logit|/c = {float(pre.abs().max()) / c_final:.3f} "
                  f"(c = {c_final})")
            assert attn_cap > 0.5 and float(pre.abs().max()) / c_final > 0.5, "a soft cap is not clearly active"

    print(f"[{name}] rms of H_k, k=0..L: {[f'{x:.3g}' for x in hidden.pow(2).mean((1, 2)).sqrt().tolist()]}")
    ent = -(probs * probs.log()).sum(-1)
    print(f"[{name}] entropy over positions: min {float(ent.min()):.3f} max {float(ent.max()):.3f} "
          f"(log V = {math.log(V):.3f}); max p range {float(probs.max(-1).values.min()):.3f}.."
          f"{float(probs.max(-1).values.max()):.3f}")
    assert 0.1 < float(ent.min()) and float(ent.max()) < 0.95 * math.log(V)
    if probe:
        return None

    gen = torch.Generator().manual_seed(spec["seed"] + 200)
    samples = torch.stack([torch.multinomial(probs[t], S, replacement=True, generator=gen) for t in pos])

    P = len(pos)
    fisher = torch.zeros(L + 1, P, d, d, dtype=torch.float64)
    sampled = torch.zeros_like(fisher)
    full_checks = {(0, 0), (L, P - 1), (L // 2 + 1, P // 2), (1, P - 1)}
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
            if (k, i) in full_checks:  # full score-path check
                Gall = torch.stack([score(model, ids, k, t, h0_kt, y) for y in range(V)])
                F_score = (Gall * p[:, None]).T @ Gall
                assert rel(F_score, fisher[k, i]) < 1e-11, rel(F_score, fisher[k, i])
                eps, E = 1e-5, torch.eye(d, dtype=torch.float64)  # central differences, no autograd
                with torch.no_grad():
                    J_fd = torch.stack([(logits_with_h(model, ids, k, t, h0_kt + eps * E[j])
                                         - logits_with_h(model, ids, k, t, h0_kt - eps * E[j])) / (2 * eps)
                                        for j in range(d)], dim=1)
                assert rel(J_fd, J) < 1e-7, rel(J_fd, J)
                print(f"[{name}] (layer {k}, position {t}): |J_fd - J|/|J| = {rel(J_fd, J):.1e}, "
                      f"|F_score - F|/|F| = {rel(F_score, fisher[k, i]):.1e}")
    norms = fisher.flatten(2).norm(dim=-1)
    for k in range(L + 1):
        print(f"[{name}] layer {k}: ||F||_F over positions {float(norms[k].min()):.3g}..{float(norms[k].max()):.3g}, "
              f"||F_S||_F {float(sampled[k].flatten(1).norm(dim=-1).min()):.3g}.."
              f"{float(sampled[k].flatten(1).norm(dim=-1).max()):.3g}")

    ref = dict(input_ids=ids, logits=logits, hidden=hidden, positions=torch.tensor(pos, dtype=torch.int64),
               fisher=fisher, sample_tokens=samples, sampled_fisher=sampled)
    save_file({k: v.detach().contiguous() for k, v in ref.items()}, str(out_dir / "reference.safetensors"))
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    check_keys(arch, model, keys)
    print(f"[{name}] checkpoint keys: {len(keys)}; non-layer keys: "
          f"{[k for k in keys if '.h.' not in k and '.layers.' not in k]}; block-0 keys: "
          f"{[k.split('.0.', 1)[1] for k in keys if '.h.0.' in k or '.layers.0.' in k]}")
    return dict(arch=arch, model_class=type(model).__name__, config_class=type(cfg).__name__,
                model_type=cfg.model_type, config_kwargs=spec["cfg"], attn_implementation="eager",
                seed=spec["seed"], input_ids_seed=spec["seed"] + 100, sample_seed=spec["seed"] + 200,
                T=T, positions="all (0..T-1)", S=S, initializer_range=spec["cfg"]["initializer_range"])


def check_keys(arch, model, keys):
    cfg = model.config
    d, H = cfg.hidden_size, cfg.num_attention_heads
    if arch == "gpt2":
        assert all(k.startswith("transformer.") for k in keys) and "lm_head.weight" not in keys, keys
        assert not any(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in keys)
        assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (d, 3 * d)  # Conv1D [in, out]
        return
    if arch == "gptneox":  # lm_head is renamed back to the hub name embed_out on save
        assert "embed_out.weight" in keys and "lm_head.weight" not in keys, keys
        assert "gpt_neox.layers.0.attention.query_key_value.weight" in keys
        assert not any(k.endswith("attention.bias") or k.endswith("masked_bias") for k in keys)
        return
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings), keys
    pre = "model.layers.0."
    if arch == "phi3":
        kv = cfg.num_key_value_heads
        assert pre + "self_attn.qkv_proj.weight" in keys and pre + "mlp.gate_up_proj.weight" in keys, keys
        assert tuple(model.model.layers[0].self_attn.qkv_proj.weight.shape) == ((H + 2 * kv) * d // H, d)
        assert tuple(model.model.layers[0].mlp.gate_up_proj.weight.shape) == (2 * cfg.intermediate_size, d)
    if arch in ("qwen3", "olmo2", "gemma3"):
        assert pre + "self_attn.q_norm.weight" in keys and pre + "self_attn.k_norm.weight" in keys, keys
    if arch in GEMMA:
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            assert f"{pre}{n}.weight" in keys, (n, keys)
    if arch == "olmo2":
        assert pre + "input_layernorm.weight" not in keys and pre + "post_feedforward_layernorm.weight" in keys


# ---------------------------------------------------------------- GGUF copies (llama.cpp's converter)
# model.gguf is written by llama.cpp's own convert_hf_to_gguf.py (its conversion/ package and its
# vendored gguf-py), taken from the llama-cpp-python sdist, which vendors llama.cpp as a submodule.
LLAMA_CPP = dict(package="llama-cpp-python", version="0.3.36",
                 sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                 llama_cpp_commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f")
GGUF_FIXTURES = ("llama-tiny-tied", "llama-tiny-untied", "gemma2-tiny", "gemma3-tiny", "qwen3-tiny", "pythia-tiny",
                 "gptneox-sequential-tiny", "phi3-tiny", "olmo2-tiny", "mistral-window-tiny")
TRANSFORMERS_GGUF = ("llama", "qwen3", "phi3", "gemma2", "gemma3")  # archs transformers 5.24 can load from GGUF
# Runs in a subprocess (the converter puts its own gguf-py first on sys.path). Three patches, all outside
# the tensor / hyper-parameter code: the tiny tokenizer's pre-tokenizer hash is not in the converter's
# table (it is a plain GPT-2 byte-level BPE: "gpt-2"); Gemma-2's converter only knows SentencePiece
# tokenizers, so it takes the converter's own GPT-2 BPE path; the GPT-NeoX converter reads `rotary_pct`,
# which transformers 5.x config.json no longer has (it became rope_parameters.partial_rotary_factor).
_CONVERT_DRIVER = r"""
import sys
from pathlib import Path
llama_cpp, src, out = sys.argv[1:4]
sys.path.insert(0, llama_cpp)
import convert_hf_to_gguf as conv
from conversion import load_all_models
load_all_models()
from conversion.base import ModelBase, TextModel
from conversion.gemma import Gemma2Model
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
_stock = ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    h = _stock(dir_model, is_mistral_format)
    if h.get("model_type") == "gpt_neox" and "rotary_pct" not in h:
        h["rotary_pct"] = h["rope_parameters"]["partial_rotary_factor"]
    return h
ModelBase.load_hparams = staticmethod(load_hparams)
sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", "f32", "--outfile", out]
conv.main()
"""


def gguf_py_version(llama_cpp):
    for line in (llama_cpp / "gguf-py" / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=")[1].strip().strip('"')
    return None


def cache_dir():
    return Path(os.environ.get("FISHER_STEIN_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fisher-stein")


def default_llama_cpp():
    return cache_dir() / f"llama_cpp_python-{LLAMA_CPP['version']}" / "vendor" / "llama.cpp"


def fetch_llama_cpp():
    """pip download the pinned llama-cpp-python sdist, check its sha256, extract the converter only."""
    target = default_llama_cpp()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP["package"],
                        f"{LLAMA_CPP['package']}=={LLAMA_CPP['version']}", "-d", tmp], check=True)
        sdist = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP['version']}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        assert digest == LLAMA_CPP["sdist_sha256"], f"sdist sha256 {digest} != {LLAMA_CPP['sdist_sha256']}"
        prefix = f"llama_cpp_python-{LLAMA_CPP['version']}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(
                tuple(prefix + x for x in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")))]
            tf.extractall(cache_dir(), members=members, filter="data")
    return target


def tiny_tokenizer(V):
    """A consistent byte-level BPE with exactly V tokens: 'Ġ' (byte-level space) and a..z, then the merges
    'x y' -> 'xy' for x in (Ġ, a..z), y in a..z in that order, and '<|endoftext|>' (special) as id V-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    letters = list("abcdefghijklmnopqrstuvwxyz")
    base_tokens = ["\u0120"] + letters
    vocab, merges = {t: i for i, t in enumerate(base_tokens)}, []
    for a in base_tokens:
        for b in letters:
            if len(vocab) < V - 1:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.get_vocab_size() == V and tok.token_to_id("<|endoftext|>") == V - 1
    return tok


def write_gguf(name, root, llama_cpp):
    """tests/fixtures/NAME/model.gguf: convert_hf_to_gguf.py --outtype f32 on a copy of the fixture's
    config.json + model.safetensors plus the tiny tokenizer (tokenizer.json, tokenizer_config.json; not
    committed). The copy's directory carries the fixture's name (the converter derives general.name)."""
    fx = root / name
    V = json.loads((fx / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(fx / f, src / f)
        tiny_tokenizer(V).save(str(src / "tokenizer.json"))
        (src / "tokenizer_config.json").write_text(json.dumps(
            dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>")))
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", _CONVERT_DRIVER, str(llama_cpp), str(src), str(fx / "model.gguf")],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            raise RuntimeError(f"convert_hf_to_gguf.py failed for {name}")


def check_gguf(name, root):
    """The GGUF's weights, read back by transformers' GGUF loader, reproduce the safetensors model."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig
    fx = root / name
    reader = GGUFReader(str(fx / "model.gguf"))
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    with safe_open(str(fx / "reference.safetensors"), "pt") as f:
        ids = f.get_tensor("input_ids")
    cfg = AutoConfig.from_pretrained(fx)
    ref = AutoModelForCausalLM.from_pretrained(fx, attn_implementation="eager").eval()
    with torch.no_grad():
        z_ref = ref(ids[None]).logits[0]
    if arch not in TRANSFORMERS_GGUF:
        print(f"[{name}] model.gguf ({arch}, {len(reader.tensors)} tensors): transformers cannot load this "
              f"architecture from GGUF; check_fixtures.py checks it tensor by tensor")
        return
    if isinstance(cfg, MistralConfig):  # a llama GGUF: load as Llama, move the weights into Mistral
        g = AutoModelForCausalLM.from_pretrained(fx, gguf_file="model.gguf", attn_implementation="eager").eval()
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        model.load_state_dict(g.state_dict())
        with torch.no_grad():
            z_gguf_cfg = g(ids[None]).logits[0]
        W = cfg.sliding_window
        note = (f"GGUF-only config ({type(g).__name__}, no window): max |dz| = "
                f"{float((z_gguf_cfg[:W] - z_ref[:W]).abs().max()):.1e} at t < {W}, "
                f"{float((z_gguf_cfg[W:] - z_ref[W:]).abs().max()):.1e} at t >= {W}")
    else:
        model = AutoModelForCausalLM.from_pretrained(fx, gguf_file="model.gguf", config=cfg,
                                                     attn_implementation="eager").eval()
        try:
            g = AutoModelForCausalLM.from_pretrained(fx, gguf_file="model.gguf", attn_implementation="eager").eval()
            with torch.no_grad():
                note = f"GGUF-only config: max |dz| = {float((g(ids[None]).logits[0] - z_ref).abs().max()):.1e}"
        except Exception as e:  # noqa: BLE001 - informational only
            note = f"GGUF-only config does not load ({type(e).__name__})"
    with torch.no_grad():
        z = model(ids[None]).logits[0]
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert sd_ref.keys() == sd.keys()
    dw = max(float((sd_ref[k] - sd[k]).abs().max()) for k in sd_ref)
    dz = float((z - z_ref).abs().max())
    assert dw <= 2.4e-7 and dz <= 1e-5, (dw, dz)  # Gemma norms: (1 + w) - 1 rounds in f32
    how = ("weights from transformers' GGUF loader (as Llama) moved into MistralForCausalLM(config.json)"
           if isinstance(cfg, MistralConfig) else "transformers' GGUF loader with config=config.json")
    print(f"[{name}] model.gguf ({arch}, {len(reader.tensors)} tensors), {how}: max |dw| = {dw:.1e}, "
          f"max |dz| (f32 logits) = {dz:.1e}; {note}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated fixture names (VERSIONS.json untouched)")
    ap.add_argument("--probe", action="store_true", help="statistics only, nothing written")
    ap.add_argument("--llama-cpp", default=None, type=Path,
                    help="llama.cpp source dir with convert_hf_to_gguf.py (default: the cached sdist, see --fetch-llama-cpp)")
    ap.add_argument("--fetch-llama-cpp", action="store_true",
                    help=f"pip download llama-cpp-python=={LLAMA_CPP['version']} (sdist, sha256-checked) into the cache")
    ap.add_argument("--no-gguf", action="store_true", help="do not (re)write model.gguf")
    args = ap.parse_args()
    llama_cpp = None
    if not (args.probe or args.no_gguf):
        llama_cpp = fetch_llama_cpp() if args.fetch_llama_cpp else (args.llama_cpp or default_llama_cpp())
        if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
            print(f"no llama.cpp converter at {llama_cpp}: model.gguf files are left as they are "
                  f"(use --fetch-llama-cpp or --llama-cpp DIR, or --no-gguf to silence this)")
            llama_cpp = None
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    patch_float64()
    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    only = set(args.only.split(",")) if args.only else None
    specs = [s for s in FIXTURES if only is None or s["name"] in only]
    assert only is None or len(specs) == len(only), f"unknown fixture in {only}"
    fixtures = {}
    for spec in specs:
        t0 = datetime.datetime.now()
        fixtures[spec["name"]] = make_fixture(spec, root, probe=args.probe)
        if llama_cpp is not None and spec["name"] in GGUF_FIXTURES:
            write_gguf(spec["name"], root, llama_cpp)
        if not args.probe and (root / spec["name"] / "model.gguf").is_file():
            check_gguf(spec["name"], root)
        print(f"[{spec['name']}] {(datetime.datetime.now() - t0).total_seconds():.1f} s")
    if args.probe or only is not None:
        return 0
    if llama_cpp is not None:
        gguf = dict(converter="llama.cpp convert_hf_to_gguf.py --outtype f32 (conversion/ package, vendored "
                              "gguf-py), from the llama-cpp-python sdist",
                    **LLAMA_CPP, gguf_py_version=gguf_py_version(llama_cpp), fixtures=list(GGUF_FIXTURES),
                    tokenizer="tiny byte-level BPE (make_fixtures.tiny_tokenizer), pre-tokenizer 'gpt-2'",
                    patches=["get_vocab_base_pre -> 'gpt-2'", "Gemma2Model.set_vocab -> _set_vocab_gpt2",
                             "gpt_neox hparams: rotary_pct = rope_parameters.partial_rotary_factor"])
    else:  # model.gguf files untouched: keep their record
        old = root / "VERSIONS.json"
        gguf = json.loads(old.read_text()).get("gguf") if old.is_file() else None
    versions = dict(script="tools/make_fixtures.py", python=platform.python_version(),
                    torch=torch.__version__, transformers=transformers.__version__,
                    safetensors=safetensors.__version__, numpy=np.__version__,
                    tokenizers=__import__("tokenizers").__version__,
                    norm_weight_scale=NORM_W_SCALE, bias_scale=BIAS_SCALE,
                    date=datetime.date.today().isoformat(), fixtures=fixtures, gguf=gguf)
    (root / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    total = sum(f.stat().st_size for s in FIXTURES for f in (root / s["name"]).iterdir() if f.is_file())
    print(f"total size of the {len(FIXTURES)} fixture directories: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
