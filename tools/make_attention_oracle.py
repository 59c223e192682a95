#!/usr/bin/env python3
"""Float64 oracle for the Fisher information of ATTENTION distributions, on the 12 tiny fixtures.

Run from the repository root (after tools/make_fixtures.py; about 10 s, 1 thread, 0.9 GB peak RSS):
    /root/.venvs/fisher-stein-ref/bin/python tools/make_attention_oracle.py
Reads tests/fixtures/NAME/{config.json, model.safetensors, reference.safetensors} for every fixture
listed in tests/fixtures/VERSIONS.json and writes tests/fixtures/NAME/attention.safetensors plus
tests/fixtures/attention-oracle.json.  Deterministic: reruns give byte-identical safetensors files
(the JSON carries a date).  Option: --only NAME[,NAME..] (those fixtures only, JSON untouched).

The model is the saved f32 checkpoint loaded by transformers (AutoModelForCausalLM, eager attention)
and cast to float64 with make_fixtures.py's float64 patches (patch_float64, to_float64): the
attention probabilities are transformers' own (Gemma-2 soft-capping, q/k norms, GQA, partial
rotary, sliding windows included); nothing of the attention is re-implemented here.

Conventions (L = number of blocks, T = sequence length, d = hidden size, H = number of QUERY heads;
blocks are numbered 0..L-1):
  * split layer k = L - 2.  H_k [T, d] is the residual stream of make_fixtures.py: k = 0 the
    embedding output, k = i the output of block i-1, i.e. the input of block k.  It is the
    reference's hidden[k] (asserted equal).
  * layers = [L-2, L-1]: the attentions of block k itself and of the block after it.
  * positions [P]: the query positions t (all of 0..T-1 unless the fixture's log_jacobian would
    exceed 512 KiB; then the 8 positions round(linspace(1, T-1, 8)); see choose_positions).
  * weights[i, j, p, s] = a_{l,j}(t, s): attention probability of block l = layers[i], query head j,
    query position t = positions[p], key position s (0..T-1), from output_attentions=True of the
    plain float64 forward over the full sequence.  Rows sum to 1; a = 0 exactly for the keys the
    query cannot see (s > t, or t - s >= W on a layer with sliding window W).
  * log_jacobian[i, j, p, s, :] = g_{l,j,t,s} = d log a_{l,j}(t, s) / d h   (a d-vector),
    h = H_k[t], every other row of H_k held at its value: a forward hook on layer_modules(model)[k]
    replaces row t of its output by the leaf h and the FULL model runs over the full sequence (no
    KV cache), exactly as make_fixtures.logits_with_h does for the logits; obtained with
    torch.autograd.functional.jacobian of log a restricted to the visible keys.
    Masked keys (a = 0: s > t, or outside the window): log_jacobian = 0 (log a = -inf there).
  * The Fisher information of the attention distribution of (l, j, t) with respect to h is then
        F = sum_s a_s g_s g_s^T = J^T (diag a - a a^T) J,   J = d x / d h,
    x the row of attention scores (pre-softmax, after Gemma-2's soft-cap), since g_s = J^T (e_s - a);
    the score vectors g_s have mean sum_s a_s g_s = 0.  F is not stored; it is checked.

Self-checks (asserted before anything is written; a failed check aborts):
  * H_k equals the reference's hidden[k] and the logits the reference's logits (to 1e-14);
  * weights: rows sum to 1 (1e-13), are exactly zero where and only where the mask says so, and
    equal bit for bit what the hooked forward gives with h = H_k[t] unchanged;
  * sum_s a_s g_s = 0: |sum_s a_s g_s| <= 1e-10 max_s |g_s|, per layer, head and position
    (observed <= 6e-16).  Measured against sum_s a_s |g_s| instead it reaches 2.6e-7 on GPT-2's
    nearly one-hot rows (that row's smallest a is 1.9e-16; the smallest visible a anywhere is 2e-19,
    gpt2-tiny-b): the score of the dominant key, (1 - a_max) x O(|g|), carries the absolute
    rounding error eps x O(|g|) of 1 - a_max.  So an entry of log_jacobian is accurate to about
    1e-16 max_s |g_s| of its row, not relative to itself: compare with a tolerance on the row (or
    tensor) norm;
  * a central finite difference of log a (float64, step 1e-5 |h|, no autograd) along 2 seeded
    random unit directions v agrees with J v (all heads and visible keys of both layers together)
    to 1e-6 relative, at every position;
  * F = sum_s a_s g_s g_s^T (G = the rows g_s, visible keys) is symmetric (1e-12) and PSD
    (min eig >= -1e-10 trace) and equals the centred form G^T diag(a) G - m m^T, m = G^T a (1e-10).
Run time here: 10 s wall for all twelve (4.4 s of it the oracle, the rest imports); 3.73 MB written.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (imports only: no fixture is built on import)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

PER_FIXTURE_CAP = 512 * 1024  # bytes of log_jacobian with every position; above it: a subset
SUBSET_P = 8
TOTAL_CAP = 4_000_000  # bytes: all files this script writes
N_DIR, FD_REL, SUM_REL = 2, 1e-6, 1e-10


def choose_positions(T, H, d, windows):
    full_bytes = 2 * H * T * T * d * 8
    if full_bytes <= PER_FIXTURE_CAP:
        pos = list(range(T))
    else:
        pos = sorted({int(round(x)) for x in np.linspace(1, T - 1, SUBSET_P)})
    assert 1 in pos and T - 1 in pos
    for W in windows:
        if W is not None:
            assert any(t >= W for t in pos), "no query position beyond the sliding window"
    return pos


def attention_rows(model, ids, k, t, h, layers):
    """Attention rows a_{l}(t, .) [H, T] of the blocks in `layers`, full-sequence forward with row t of
    the layer-k activation replaced by h (the hook of make_fixtures.logits_with_h)."""
    def hook(m, i, o):
        x = mf._out(o)
        return mf._with(o, torch.cat([x[:, :t], h[None, None].to(x.dtype), x[:, t + 1:]], dim=1))
    handle = mf.layer_modules(model)[k].register_forward_hook(hook)
    try:
        att = model(ids[None], use_cache=False, output_attentions=True).attentions
    finally:
        handle.remove()
    return [att[layer][0, :, t, :] for layer in layers]


def visible(T, t, W):
    s = torch.arange(T)
    return (s <= t) & ((t - s < W) if W is not None else True)


def oracle(name, root, fx_record):
    fx = root / name
    with safe_open(str(fx / "reference.safetensors"), "pt") as f:
        ids, ref_hidden, ref_logits = f.get_tensor("input_ids"), f.get_tensor("hidden"), f.get_tensor("logits")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    model = AutoModelForCausalLM.from_pretrained(fx, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    assert type(model).__name__ == fx_record["model_class"], (type(model).__name__, fx_record["model_class"])
    model, arch = mf.to_float64(model)
    assert arch == fx_record["arch"] and next(model.parameters()).dtype == torch.float64
    cfg = model.config
    T, d, L, H = ids.shape[0], cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    assert L >= 2 and T == fx_record["T"]
    k, layers = L - 2, [L - 2, L - 1]
    windows = [mf.sliding_layers(model)[layer] for layer in layers]
    pos = choose_positions(T, H, d, windows)
    P = len(pos)

    hidden, out = mf.capture_hidden(model, ids)
    assert mf.rel(hidden, ref_hidden) < 1e-14, mf.rel(hidden, ref_hidden)
    assert mf.rel(out.logits[0], ref_logits) < 1e-14, mf.rel(out.logits[0], ref_logits)
    att = [out.attentions[layer][0].detach() for layer in layers]  # [H, T, T] each
    vis = [[visible(T, t, W) for t in range(T)] for W in windows]

    weights = torch.zeros(2, H, P, T, dtype=torch.float64)
    logjac = torch.zeros(2, H, P, T, d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(fx_record["seed"] + 300)
    worst = dict(row_sum=0.0, score_mean=0.0, score_mean_a=0.0, fd=0.0, fisher_2term=0.0, min_a=1.0)
    tr_range = [math.inf, 0.0]
    for p, t in enumerate(pos):
        h0 = hidden[k, t].clone()
        for i in range(2):
            a = att[i][:, t, :]
            assert a.shape == (H, T)
            assert torch.equal(a != 0, vis[i][t].expand(H, T)), (name, layers[i], t)
            worst["row_sum"] = max(worst["row_sum"], float((a.sum(-1) - 1).abs().max()))
            weights[i, :, p] = a
        with torch.no_grad():
            hooked = attention_rows(model, ids, k, t, h0, layers)
        for i in range(2):
            assert torch.equal(hooked[i], weights[i, :, p]), (name, layers[i], t, "hooked != plain")

        keys = [vis[i][t].nonzero()[:, 0] for i in range(2)]

        def log_a(h):
            rows = attention_rows(model, ids, k, t, h, layers)
            return tuple(rows[i][:, keys[i]].log() for i in range(2))

        jac = torch.autograd.functional.jacobian(log_a, h0, vectorize=True)  # ([H, n_i, d], ...)
        for i in range(2):
            assert jac[i].shape == (H, len(keys[i]), d)
            logjac[i, :, p, keys[i]] = jac[i]

        # finite differences of log a along random unit directions (no autograd)
        eps = 1e-5 * float(h0.norm())
        for _ in range(N_DIR):
            v = torch.randn(d, generator=gen, dtype=torch.float64)
            v = v / v.norm()
            with torch.no_grad():
                plus, minus = log_a(h0 + eps * v), log_a(h0 - eps * v)
            fd = torch.cat([((plus[i] - minus[i]) / (2 * eps)).flatten() for i in range(2)])
            jv = torch.cat([(jac[i] @ v).flatten() for i in range(2)])
            e = mf.rel(fd, jv)
            assert e < FD_REL, (name, t, e)
            worst["fd"] = max(worst["fd"], e)

        # score mean zero and the Fisher of each attention distribution
        for i in range(2):
            for j in range(H):
                a, G = weights[i, j, p, keys[i]], logjac[i, j, p, keys[i]]  # [n], [n, d]
                m = a @ G
                gn = G.norm(dim=-1)
                r = float(m.norm()) / max(float(gn.max()), 1e-300)
                assert r <= SUM_REL, (name, layers[i], j, t, r)
                worst["score_mean"] = max(worst["score_mean"], r)
                worst["score_mean_a"] = max(worst["score_mean_a"], float(m.norm()) / max(float(a @ gn), 1e-300))
                worst["min_a"] = min(worst["min_a"], float(a.min()))
                F = G.T @ (a[:, None] * G)
                F2 = G.T @ torch.diag(a) @ G - torch.outer(m, m)
                e2 = mf.rel(F, F2)
                assert e2 < 1e-10, (name, layers[i], j, t, e2)
                worst["fisher_2term"] = max(worst["fisher_2term"], e2)
                mf.check_fisher(F)
                if t > 0:
                    tr = float(torch.trace(F))
                    tr_range = [min(tr_range[0], tr), max(tr_range[1], tr)]
    assert worst["row_sum"] < 1e-13, worst
    # the zero pattern of log_jacobian: zero exactly on masked keys; every (layer, head) row with t > 0
    # moves with h (at t = 0 the single key has a = 1 exactly, so its row is 0)
    for i in range(2):
        for p, t in enumerate(pos):
            masked = ~vis[i][t]
            assert not logjac[i, :, p, masked].any()
            if t > 0:
                assert logjac[i, :, p, ~masked].abs().amax((-2, -1)).min() > 0, (name, layers[i], t)

    tensors = dict(split_layer=torch.tensor([k], dtype=torch.int64),
                   layers=torch.tensor(layers, dtype=torch.int64),
                   positions=torch.tensor(pos, dtype=torch.int64),
                   weights=weights.contiguous(), log_jacobian=logjac.contiguous())
    path = fx / "attention.safetensors"
    save_file(tensors, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"[{name}] k={k} layers={layers} windows={windows} H={H} T={T} d={d} P={P} positions={pos}")
    print(f"[{name}] worst: |row sum - 1| {worst['row_sum']:.1e}, |sum a g|/max|g| {worst['score_mean']:.1e} "
          f"(/sum a|g| {worst['score_mean_a']:.1e}), min visible a {worst['min_a']:.1e}, "
          f"FD rel {worst['fd']:.1e}, F two-term rel {worst['fisher_2term']:.1e}; trace F (t>0) "
          f"{tr_range[0]:.3g}..{tr_range[1]:.3g}; {path.stat().st_size} bytes, sha256 {digest[:16]}")
    rec = dict(arch=arch, model_class=type(model).__name__, L=L, k=k, layers=layers, windows=windows,
               positions=pos, P=P, H=H, num_key_value_heads=getattr(cfg, "num_key_value_heads", H),
               head_dim=mf.head_dim_of(cfg), T=T, d=d,
               min_visible_weight=worst["min_a"],
               checks=dict(max_row_sum_err=worst["row_sum"], max_score_mean_rel_max_g=worst["score_mean"],
                           max_score_mean_rel_sum_a_g=worst["score_mean_a"],
                           max_fd_rel=worst["fd"], max_fisher_two_term_rel=worst["fisher_2term"]),
               fisher_trace_range_t_gt_0=tr_range, bytes=path.stat().st_size, sha256=digest)
    return rec, path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated fixture names (attention-oracle.json untouched)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    mf.patch_float64()
    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    versions = json.loads((root / "VERSIONS.json").read_text())
    names = list(versions["fixtures"])
    only = set(args.only.split(",")) if args.only else None
    assert only is None or only <= set(names), f"unknown fixture in {only}"
    t_all = time.perf_counter()
    fixtures, written = {}, []
    for name in names:
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        fixtures[name], path = oracle(name, root, versions["fixtures"][name])
        written.append(path)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s")
    if only is None:
        rec = dict(script="tools/make_attention_oracle.py", python=platform.python_version(),
                   torch=torch.__version__, transformers=transformers.__version__,
                   safetensors=safetensors.__version__, numpy=np.__version__,
                   date=datetime.date.today().isoformat(),
                   file="NAME/attention.safetensors",
                   tensors=dict(split_layer="i64 [1]: k = L-2", layers="i64 [2]: L-2, L-1",
                                positions="i64 [P]: query positions t",
                                weights="f64 [2, H, P, T]: a_{layers[i], head j}(positions[p], s)",
                                log_jacobian="f64 [2, H, P, T, d]: d log a / d H_k[t]; 0 for masked keys"),
                   fixtures=fixtures)
        js = root / "attention-oracle.json"
        js.write_text(json.dumps(rec, indent=2) + "\n")
        written.append(js)
        total = sum(p.stat().st_size for p in written)
        print(f"total size of the {len(written)} files written: {total} bytes")
        assert total < TOTAL_CAP, total
    print(f"total {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
