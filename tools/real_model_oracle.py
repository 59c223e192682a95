"""Float64 Fisher oracles for the two real GGUF models, with transformers' own GGUF loader.

    /root/.venvs/fisher-stein-ref/bin/python tools/real_model_oracle.py gemma3-270m
    /root/.venvs/fisher-stein-ref/bin/python tools/real_model_oracle.py smollm2

(each fetches its GGUF with tools/fetch_gemma3.sh / tools/fetch_smollm2.sh; pass --gguf PATH to
use another copy) and writes tests/fixtures/<name>-oracle.safetensors + <name>-oracle.json.

Model    ids (last position t)                          layers k
gemma3-270m  [2, 818, 5279, 529, 7001, 563] (BOS 2 first)   0, 6, 12, 17, 18 (of 18)
smollm2      [504, 3575, 282, 4649, 314] (no BOS)           0, 15, 30 (of 30)

Conventions (those of tools/make_fixtures.py, whose float64 patches and helpers this reuses):
  * layer k = the residual stream entering block k: k = 0 is the output of the embedding
    module, k = i the output of block i-1, k = L the last block's output BEFORE the final norm.
    Gemma-3: the embedding module is Gemma3TextScaledWordEmbedding, whose forward returns
    embed_tokens[x] * embed_scale with embed_scale = sqrt(hidden_size) (a float32 buffer in the
    stock model, exact float64 sqrt(640) here): layer 0 is the SCALED embedding, as
    Gemma3TextModel.forward feeds it to block 0.
  * u = final-norm output at t (d_u = d), z = lm_head(u) the logits (no soft-capping in either
    model: asserted), p = softmax(z) in float64 over the whole vocabulary.
  * A = du/dh (d x d): torch.autograd.functional.jacobian of the FULL model over the full
    sequence, a forward hook on the layer-k module replacing row t of its output by h (every
    other row fixed, no KV cache). G = sum_y p_y (w_y - m)(w_y - m)^T, m = sum_y p_y w_y (rows
    w_y of the tied lm_head, accumulated in vocabulary chunks). F = A^T G A, symmetrised.
  * Everything in float64: model.double() plus make_fixtures' patches of RMSNorm (Gemma's
    x * (1 + w) included), RoPE cos/sin (inverse frequencies recomputed in float64 per layer
    type) and the eager attention softmax; eager attention throughout.

Self-checks (asserted): the hooked forward with the captured row equals the plain forward bit
for bit; lm_head(u) equals the model's logits; F symmetric and PSD; for 3 random unit
directions v per layer, F v equals J^T (diag p - p p^T) (J v) where J v is a central finite
difference of the float64 logits (step 1e-5 ||h||) and J^T r a vector-Jacobian product of the
hooked logits, to 1e-6 relative.

Output: safetensors tensors
  fisher_upper  f32 [n_layers, d(d+1)/2]  F's upper triangle, row by row (numpy.triu_indices(d)
                order: F[i, j], i <= j, at i*d - i*(i-1)/2 + (j - i))
  fisher_norm   f64 [n_layers]            ||F||_F (of the float64 F)
  fisher_trace  f64 [n_layers]
  hidden        f32 [n_layers, d]         h = H_k[t]
  layers        i64 [n_layers]; position i64 [1]; input_ids i64 [T]
  top10_ids_f64 i64 [10], top10_probs_f64 f64 [10]   float64 forward
  top10_ids_f32 i64 [10], top10_probs_f32 f64 [10]   stock float32 forward (softmax of its
                                                     logits taken in float64)
and a JSON with the same small values, versions, timings, peak memory and (Gemma) the norm
weight convention of the GGUF.
"""
import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {
    "gemma3-270m": dict(fetch="tools/fetch_gemma3.sh", ids=[2, 818, 5279, 529, 7001, 563],
                        layers=[0, 6, 12, 17, 18], prompt="<bos>The capital of France is"),
    "smollm2": dict(fetch="tools/fetch_smollm2.sh", ids=[504, 3575, 282, 4649, 314],
                    layers=[0, 15, 30], prompt="The capital of France is"),
}
FD_STEP, FD_TOL, N_DIRECTIONS = 1e-5, 1e-6, 3


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Clock:
    def __init__(self):
        self.t0, self.marks = time.perf_counter(), {}

    def mark(self, what):
        t = time.perf_counter()
        self.marks[what] = round(t - self.t0, 2)
        print(f"  [{what}: {t - self.t0:.1f} s, peak RSS {peak_rss_gb():.2f} GB]", flush=True)
        self.t0 = t


def load(path):
    folder, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model.eval()


def top10(logits):
    p = torch.softmax(logits.double(), -1)
    top = torch.topk(p, 10)
    return top.indices.tolist(), top.values.tolist()


def norm_convention(path, model):
    """GGUF norm weights (raw) against the ones transformers loaded."""
    import gguf
    reader = gguf.GGUFReader(path)
    raw = {t.name: torch.tensor(np.array(t.data, dtype=np.float32)).reshape(-1)
           for t in reader.tensors if t.name.endswith("norm.weight")}
    lay = model.model.layers[0]
    pairs = {"blk.0.attn_norm.weight": lay.input_layernorm,
             "blk.0.post_attention_norm.weight": lay.post_attention_layernorm,
             "blk.0.ffn_norm.weight": lay.pre_feedforward_layernorm,
             "blk.0.post_ffw_norm.weight": lay.post_feedforward_layernorm,
             "blk.0.attn_q_norm.weight": lay.self_attn.q_norm,
             "blk.0.attn_k_norm.weight": lay.self_attn.k_norm,
             "output_norm.weight": model.model.norm}
    out = {}
    for name, mod in pairs.items():
        r, w = raw[name].double(), mod.weight.detach().double().reshape(-1)
        out[name] = dict(gguf_type=next(t.tensor_type.name for t in reader.tensors if t.name == name),
                         raw_mean=float(r.mean()), raw_min=float(r.min()), raw_max=float(r.max()),
                         loaded_mean=float(w.mean()), loaded_min=float(w.min()), loaded_max=float(w.max()),
                         max_abs_raw_minus_loaded_minus_1=float((r - w - 1).abs().max()))
        print(f"  {name:34s} GGUF raw mean {r.mean():+.4f} [{r.min():+.3f}, {r.max():+.3f}]  "
              f"transformers w mean {w.mean():+.4f}  max|raw - w - 1| {float((r - w - 1).abs().max()):.1e}")
    return out


def hooked_base(model, ids, k, t, h):
    """Final-norm output u at t with row t of the layer-k activation replaced by h."""
    def hook(m, i, o):
        x = mf._out(o)
        return mf._with(o, torch.cat([x[:, :t], h[None, None].to(x.dtype), x[:, t + 1:]], dim=1))
    handle = mf.layer_modules(model)[k].register_forward_hook(hook)
    try:
        return mf.base(model)(input_ids=ids[None], use_cache=False).last_hidden_state[0, t]
    finally:
        handle.remove()


def centered_readout_metric(W, p, chunk=32768):
    """G = sum_y p_y (w_y - m)(w_y - m)^T and m = W^T p, float64, in vocabulary chunks."""
    m = W.T @ p
    G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
    for s in range(0, W.shape[0], chunk):
        Wc = W[s:s + chunk] - m[None]
        G += (Wc * p[s:s + chunk, None]).T @ Wc
    return 0.5 * (G + G.T), m


def run(name, path, clock):
    spec = MODELS[name]
    ids = torch.tensor(spec["ids"])
    t = len(spec["ids"]) - 1
    mf.patch_float64()
    model = load(path)
    cfg = model.config
    assert getattr(cfg, "final_logit_softcapping", None) is None, "soft-capped logits"
    assert getattr(cfg, "tie_word_embeddings", True)
    info = dict(model_type=cfg.model_type, n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
                vocab_size=cfg.vocab_size, tied=bool(model.lm_head.weight is mf.base(model).embed_tokens.weight))
    print(f"{name}: {info}")
    clock.mark("load f32")
    norms = norm_convention(path, model) if cfg.model_type == "gemma3_text" else None

    with torch.no_grad():
        z32 = model(ids[None], use_cache=False).logits[0, t]
    ids32, p32 = top10(z32)
    clock.mark("f32 forward")

    model, arch = mf.to_float64(model)
    H, _ = mf.capture_hidden(model, ids)
    with torch.no_grad():
        z64 = model(ids[None], use_cache=False).logits[0, t]
        u = mf.base(model)(input_ids=ids[None], use_cache=False).last_hidden_state[0, t]
        assert torch.equal(mf.final_norm(model)(H[-1][None])[0, t], u)
        assert mf.rel(model.lm_head(u), z64) < 1e-13
    ids64, p64 = top10(z64)
    if cfg.model_type == "gemma3_text":  # layer 0 is the scaled embedding
        emb = model.model.embed_tokens.weight.detach()[ids] * math.sqrt(cfg.hidden_size)
        assert mf.rel(H[0], emb) < 1e-15
    print("  top-10 f32:", list(zip(ids32, [round(x, 6) for x in p32])))
    print("  top-10 f64:", list(zip(ids64, [round(x, 6) for x in p64])))
    print(f"  max |z_f32 - z_f64| = {float((z32.double() - z64).abs().max()):.2e}")
    W = model.lm_head.weight.detach()
    p = torch.softmax(z64, -1)
    G, _ = centered_readout_metric(W, p)
    clock.mark("f64 forward and G")

    rng = torch.Generator().manual_seed(20250817)
    out, fd_checks = [], []
    for k in spec["layers"]:
        h0 = H[k, t].clone()
        with torch.no_grad():
            assert torch.equal(hooked_base(model, ids, k, t, h0), u), f"hooked run differs at k={k}"
        try:
            A = torch.autograd.functional.jacobian(lambda h: hooked_base(model, ids, k, t, h), h0,
                                                   vectorize=True)
        except Exception as e:  # vmap over hooks may not be supported
            print(f"  vectorized jacobian failed ({type(e).__name__}): one backward per row")
            A = torch.autograd.functional.jacobian(lambda h: hooked_base(model, ids, k, t, h), h0)
        F = A.T @ G @ A
        F = mf.check_fisher(F)
        worst = 0.0
        for _ in range(N_DIRECTIONS):
            v = torch.randn(h0.shape, generator=rng, dtype=torch.float64)
            v /= v.norm()
            eps = FD_STEP * float(h0.norm())
            with torch.no_grad():
                Jv = (model.lm_head(hooked_base(model, ids, k, t, h0 + eps * v))
                      - model.lm_head(hooked_base(model, ids, k, t, h0 - eps * v))) / (2 * eps)
            r = p * Jv - p * (p @ Jv)
            h = h0.clone().requires_grad_(True)
            JTr = torch.autograd.grad(model.lm_head(hooked_base(model, ids, k, t, h)) @ r, h)[0]
            worst = max(worst, mf.rel(F @ v, JTr))
        assert worst <= FD_TOL, f"layer {k}: finite-difference check {worst:.2e} > {FD_TOL}"
        fd_checks.append(worst)
        out.append((k, F, h0))
        print(f"  layer {k:2d}: ||h|| {float(h0.norm()):9.3f}  ||F||_F {float(F.norm()):.6e}  "
              f"trace {float(torch.trace(F)):.6e}  FD check {worst:.1e}")
        clock.mark(f"layer {k}")

    d = cfg.hidden_size
    iu = torch.triu_indices(d, d)
    tensors = {
        "fisher_upper": torch.stack([F[iu[0], iu[1]] for _, F, _ in out]).float().contiguous(),
        "fisher_norm": torch.tensor([float(F.norm()) for _, F, _ in out], dtype=torch.float64),
        "fisher_trace": torch.tensor([float(torch.trace(F)) for _, F, _ in out], dtype=torch.float64),
        "hidden": torch.stack([h for _, _, h in out]).float().contiguous(),
        "layers": torch.tensor(spec["layers"], dtype=torch.int64),
        "position": torch.tensor([t], dtype=torch.int64),
        "input_ids": ids.to(torch.int64),
        "top10_ids_f64": torch.tensor(ids64, dtype=torch.int64),
        "top10_probs_f64": torch.tensor(p64, dtype=torch.float64),
        "top10_ids_f32": torch.tensor(ids32, dtype=torch.int64),
        "top10_probs_f32": torch.tensor(p32, dtype=torch.float64),
    }
    # The stored f32 matrices against the f64 ones: what a 1e-3 comparison can rely on.
    for (k, F, _), up in zip(out, tensors["fisher_upper"]):
        Fs = torch.zeros(d, d, dtype=torch.float64)
        Fs[iu[0], iu[1]] = up.double()
        Fs = Fs + Fs.T - torch.diag(torch.diag(Fs))
        assert mf.rel(Fs, F) < 1e-6, (k, mf.rel(Fs, F))
    meta = dict(
        model=name, gguf=os.path.basename(path), prompt=spec["prompt"], input_ids=spec["ids"],
        position=t, layers=spec["layers"], **info,
        layer_convention="k = residual stream entering block k; k = 0 the embedding module's output"
                         + (" (Gemma3TextScaledWordEmbedding: embed_tokens[x] * sqrt(d_model))"
                            if arch == "gemma3" else "")
                         + "; k = L the last block's output before the final norm",
        fisher="F = A^T G A, A = du/dh (u = final-norm output at the position), "
               "G = sum_y p_y (w_y - m)(w_y - m)^T over the full vocabulary, float64; stored as f32 "
               "upper triangle (numpy.triu_indices order)",
        fisher_norm=tensors["fisher_norm"].tolist(), fisher_trace=tensors["fisher_trace"].tolist(),
        hidden_norm=[float(h.norm()) for _, _, h in out],
        finite_difference_check=dict(directions=N_DIRECTIONS, step="1e-5 ||h||",
                                     worst_relative_error=fd_checks),
        top10_f64=dict(ids=ids64, probs=p64), top10_f32=dict(ids=ids32, probs=p32),
        max_abs_logit_f32_minus_f64=float((z32.double() - z64).abs().max()),
        norm_weights=norms,
        versions={"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                  "accelerate": importlib.metadata.version("accelerate"), "numpy": np.__version__},
        torch_threads=torch.get_num_threads(),
        script="tools/real_model_oracle.py",
    )
    return tensors, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--gguf", help="the GGUF file (default: fetched by the model's tools/fetch_*.sh)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or subprocess.run(["bash", os.path.join(ROOT, MODELS[args.model]["fetch"])],
                                       check=True, capture_output=True, text=True).stdout.strip()
    clock, start = Clock(), time.perf_counter()
    tensors, meta = run(args.model, path, clock)
    meta["timings_s"] = dict(clock.marks, total=round(time.perf_counter() - start, 2))
    meta["peak_rss_gb"] = round(peak_rss_gb(), 3)
    base = os.path.join(ROOT, "tests", "fixtures", f"{args.model}-oracle")
    save_file(tensors, base + ".safetensors", metadata={"script": meta["script"], "model": args.model})
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {base}.safetensors and .json in {meta['timings_s']['total']} s, peak RSS {meta['peak_rss_gb']} GB")


if __name__ == "__main__":
    main()
