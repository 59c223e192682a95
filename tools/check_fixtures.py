#!/usr/bin/env python3
"""Independent cross-check of tests/fixtures/* with numpy only (no torch, no transformers).

Re-implements every fixture family's forward pass in float64 from config.json + model.safetensors
(GPT-2, Llama, Mistral, Qwen3, Phi-3, OLMo-2, Gemma-2, Gemma-3 text, GPT-NeoX parallel and
sequential) and checks, per fixture: hidden[k] for every k, logits, and the Fisher at the last
layer L for every position, whose Jacobian has a closed form
(J = diag(softcap') . W_U . d norm_f(h)/dh). This is the reading of the checkpoint the Rust
loaders must reproduce; every statement of tools/README.md's "Checkpoint facts" is exercised here.
Run: /root/.venvs/fisher-stein-ref/bin/python tools/check_fixtures.py
"""
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
_erf = np.vectorize(math.erf)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    return g * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) + b


def rms_norm(x, g, eps):
    return g * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


ACT = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),  # exact (erf) GELU
    **{k: (lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))))
       for k in ("gelu_new", "gelu_pytorch_tanh")},  # tanh approximation
}


def attention(q, k, v, scale, window=None, softcap=None):
    """q [H, T, dh], k/v [H, T, dh] (already repeated for GQA). Query i sees key j iff
    0 <= i - j, and i - j < window on a sliding-window layer."""
    T = q.shape[1]
    s = q @ k.transpose(0, 2, 1) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (i - j >= 0) & ((i - j < window) if window is not None else True)
    return softmax(np.where(seen, s, -np.inf)) @ v


def gpt2(c, w, ids):
    T, d, H = len(ids), c["n_embd"], c["n_head"]
    eps, p = c["layer_norm_epsilon"], "transformer."
    x = w[p + "wte.weight"][ids] + w[p + "wpe.weight"][:T]
    hs = [x]
    for i in range(c["n_layer"]):
        b = f"{p}h.{i}."
        a = layer_norm(x, w[b + "ln_1.weight"], w[b + "ln_1.bias"], eps)
        qkv = a @ w[b + "attn.c_attn.weight"] + w[b + "attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = (m.reshape(T, H, d // H).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))
        o = attention(q, k, v, 1 / math.sqrt(d // H)).transpose(1, 0, 2).reshape(T, d)
        x = x + o @ w[b + "attn.c_proj.weight"] + w[b + "attn.c_proj.bias"]
        m = layer_norm(x, w[b + "ln_2.weight"], w[b + "ln_2.bias"], eps) @ w[b + "mlp.c_fc.weight"] + w[b + "mlp.c_fc.bias"]
        x = x + ACT["gelu_new"](m) @ w[b + "mlp.c_proj.weight"] + w[b + "mlp.c_proj.bias"]
        hs.append(x)
    return np.stack(hs)


def inv_freq(rp, dh):
    """RoPE inverse frequencies of one rope_parameters dict (default / linear / llama3; partial)."""
    dim = int(dh * rp.get("partial_rotary_factor", 1.0))
    inv = 1.0 / float(rp["rope_theta"]) ** (np.arange(0, dim, 2) / dim)
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        f, lo, hi, old = (rp[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        out = []
        for fr in inv:
            wl = 2 * math.pi / fr
            if wl < old / hi:
                out.append(fr)
            elif wl > old / lo:
                out.append(fr / f)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * fr / f + s * fr)
        inv = np.array(out)
    else:
        assert kind == "default", kind
    return inv


def rope(x, inv):
    """x [heads, T, dh]; rotate_half convention on the first 2*len(inv) dims, the rest passes."""
    T, r = x.shape[1], 2 * len(inv)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    xr, xp = x[..., :r], x[..., r:]
    rot = np.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], -1)
    return np.concatenate([xr * cos + rot * sin, xp], -1)


def decoder(c, w, ids):
    """Llama, Mistral, Qwen3, Phi-3, OLMo-2, Gemma-2, Gemma-3 (text)."""
    mt = c["model_type"]
    gemma = mt in ("gemma2", "gemma3_text")
    T, d, H = len(ids), c["hidden_size"], c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    dh, eps, L = c.get("head_dim") or d // H, c["rms_norm_eps"], c["num_hidden_layers"]
    scale = c["query_pre_attn_scalar"] ** -0.5 if gemma else dh ** -0.5
    act = ACT[c["hidden_activation"] if gemma else c["hidden_act"]]
    softcap = c.get("attn_logit_softcapping") if mt == "gemma2" else None  # Gemma-3 code ignores it
    if mt in ("mistral", "phi3"):
        windows = [c.get("sliding_window")] * L  # every layer
    elif "layer_types" in c and c.get("sliding_window") is not None:
        windows = [c["sliding_window"] if t == "sliding_attention" else None for t in c["layer_types"]]
    else:
        windows = [None] * L
    rp = c["rope_parameters"]
    if mt == "gemma3_text":  # one RoPE per layer type
        invs = [inv_freq(rp[t], dh) for t in c["layer_types"]]
    else:
        invs = [inv_freq(rp, dh)] * L

    def norm(x, name):  # Gemma RMSNorm multiplies by (1 + w)
        g = w[name + ".weight"]
        return rms_norm(x, 1.0 + g if gemma else g, eps)

    def lin(x, name):
        y = x @ w[name + ".weight"].T  # nn.Linear: [out, in]
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids] * (math.sqrt(d) if gemma else 1.0)
    hs = [x]
    for i in range(L):
        b = f"model.layers.{i}."
        a = x if mt == "olmo2" else norm(x, b + "input_layernorm")  # OLMo-2: no pre-norms
        if mt == "phi3":  # fused [q | k | v] along the output axis
            q, k, v = np.split(lin(a, b + "self_attn.qkv_proj"), [H * dh, H * dh + KV * dh], axis=-1)
        else:
            q, k, v = (lin(a, b + f"self_attn.{n}_proj") for n in "qkv")
        if mt == "olmo2":  # q/k RMSNorm over the whole projection, before the head split
            q, k = norm(q, b + "self_attn.q_norm"), norm(k, b + "self_attn.k_norm")
        q, k, v = (m.reshape(T, -1, dh).transpose(1, 0, 2) for m in (q, k, v))
        if mt in ("qwen3", "gemma3_text"):  # per-head q/k RMSNorm over head_dim, before RoPE
            q, k = norm(q, b + "self_attn.q_norm"), norm(k, b + "self_attn.k_norm")
        q, k = rope(q, invs[i]), rope(k, invs[i])
        k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)  # head j uses kv j // (H/KV)
        o = lin(attention(q, k, v, scale, windows[i], softcap).transpose(1, 0, 2).reshape(T, H * dh),
                b + "self_attn.o_proj")
        if gemma or mt == "olmo2":
            o = norm(o, b + "post_attention_layernorm")
        x = x + o
        a = x if mt == "olmo2" else norm(x, b + ("pre_feedforward_layernorm" if gemma else "post_attention_layernorm"))
        if mt == "phi3":  # fused [gate | up]
            g, u = np.split(lin(a, b + "mlp.gate_up_proj"), 2, axis=-1)
        else:
            g, u = lin(a, b + "mlp.gate_proj"), lin(a, b + "mlp.up_proj")
        m = lin(act(g) * u, b + "mlp.down_proj")
        if gemma or mt == "olmo2":
            m = norm(m, b + "post_feedforward_layernorm")
        x = x + m
        hs.append(x)
    return np.stack(hs)


def gpt_neox(c, w, ids):
    T, d, H = len(ids), c["hidden_size"], c["num_attention_heads"]
    hsz, eps = d // H, c["layer_norm_eps"]
    inv, act = inv_freq(c["rope_parameters"], hsz), ACT[c["hidden_act"]]

    def ln(x, name):
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps)

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = w["gpt_neox.embed_in.weight"][ids]
    hs = [x]
    for i in range(c["num_hidden_layers"]):
        b = f"gpt_neox.layers.{i}."
        qkv = lin(ln(x, b + "input_layernorm"), b + "attention.query_key_value")
        qkv = qkv.reshape(T, H, 3, hsz).transpose(2, 1, 0, 3)  # output axis laid out [heads, 3, head_dim]
        q, k, v = rope(qkv[0], inv), rope(qkv[1], inv), qkv[2]
        o = lin(attention(q, k, v, hsz ** -0.5).transpose(1, 0, 2).reshape(T, d), b + "attention.dense")
        mlp = lambda h: lin(act(lin(h, b + "mlp.dense_h_to_4h")), b + "mlp.dense_4h_to_h")  # noqa: E731
        if c["use_parallel_residual"]:  # x + attn(ln1(x)) + mlp(ln2(x))
            x = x + o + mlp(ln(x, b + "post_attention_layernorm"))
        else:  # y = x + attn(ln1(x)); y + mlp(ln2(y))
            x = x + o
            x = x + mlp(ln(x, b + "post_attention_layernorm"))
        hs.append(x)
    return np.stack(hs)


def final_norm(c, w):
    """(normalise(h) -> [d], d normalise / dh -> [d, d]) for the final norm of each family."""
    mt = c["model_type"]
    if mt in ("gpt2", "gpt_neox"):
        p = "transformer.ln_f" if mt == "gpt2" else "gpt_neox.final_layer_norm"
        g, bta = w[p + ".weight"], w[p + ".bias"]
        eps = c["layer_norm_epsilon"] if mt == "gpt2" else c["layer_norm_eps"]

        def f(x):
            d = len(x)
            xc = x - x.mean()
            s = math.sqrt((xc ** 2).mean() + eps)
            xh = xc / s
            return g * xh + bta, g[:, None] / s * (np.eye(d) - 1.0 / d - np.outer(xh, xh) / d)
        return f
    g = w["model.norm.weight"] + (1.0 if mt in ("gemma2", "gemma3_text") else 0.0)
    eps = c["rms_norm_eps"]

    def f(x):
        d = len(x)
        rr = math.sqrt((x ** 2).mean() + eps)
        return g * x / rr, g[:, None] / rr * (np.eye(d) - np.outer(x, x) / (d * rr * rr))
    return f


def unembedding(c, w):
    mt = c["model_type"]
    if mt == "gpt2":
        return w["transformer.wte.weight"]  # always tied, no lm_head.weight key
    if mt == "gpt_neox":
        assert not c["tie_word_embeddings"]
        return w["embed_out.weight"]
    return w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def check(fx):
    c = json.loads((fx / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(fx / "model.safetensors").items()}
    if c.get("tie_word_embeddings"):
        assert "lm_head.weight" not in w
    r = load_file(fx / "reference.safetensors")
    ids, L = r["input_ids"], r["hidden"].shape[0] - 1
    mt = c["model_type"]
    hidden = {"gpt2": gpt2, "gpt_neox": gpt_neox}.get(mt, decoder)(c, w, ids)
    nf, wu = final_norm(c, w), unembedding(c, w)
    cap = c.get("final_logit_softcapping")
    pre = np.stack([nf(h)[0] for h in hidden[L]]) @ wu.T
    logits = pre if cap is None else cap * np.tanh(pre / cap)
    errs = dict(hidden=rel(hidden, r["hidden"]), logits=rel(logits, r["logits"]))
    assert np.array_equal(r["positions"], np.arange(len(ids))), r["positions"]  # every position
    ef, es = 0.0, 0.0
    for i, t in enumerate(r["positions"]):  # closed-form Jacobian of the upper part at layer L
        J = wu @ nf(hidden[L][t])[1]
        if cap is not None:
            J = (1 - np.tanh(pre[t] / cap) ** 2)[:, None] * J
        p = softmax(logits[t])
        F = J.T @ (np.diag(p) - np.outer(p, p)) @ J
        ef = max(ef, rel(F, r["fisher"][L, i]))
        G = np.stack([J.T @ (np.eye(len(p))[y] - p) for y in r["sample_tokens"][i]])
        es = max(es, rel(G.T @ G / len(G), r["sampled_fisher"][L, i]))
    errs["fisher[L]"], errs["sampled_fisher[L]"] = ef, es
    assert r["sample_tokens"].dtype == np.int64
    return errs


def main():
    worst = 0.0
    fixtures = sorted(p for p in ROOT.iterdir()
                      if all((p / f).is_file() for f in ("config.json", "model.safetensors", "reference.safetensors")))
    for fx in fixtures:
        errs = check(fx)
        print(f"{fx.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        worst = max(worst, *errs.values())
    assert worst < 1e-11, worst
    print(f"all {len(fixtures)} fixtures agree with the numpy reimplementation (worst relative error {worst:.1e})")


if __name__ == "__main__":
    main()
