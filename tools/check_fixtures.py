#!/usr/bin/env python3
"""Independent cross-check of tests/fixtures/* with numpy only (no torch, no transformers).

Re-implements the GPT-2 and Llama forward passes in float64 from config.json + model.safetensors
and checks, per fixture: hidden[k] for every k, logits, and the Fisher at the last layer L,
whose Jacobian has a closed form (J = W_U . d norm_f(h)/dh). This is the reading of the
checkpoint the Rust loaders must reproduce.
Run: /root/.venvs/fisher-stein-ref/bin/python tools/check_fixtures.py
"""
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    return g * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) + b


def rms_norm(x, g, eps):
    return g * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def attention(q, k, v):  # [H, T, dh] each (k, v already repeated for GQA)
    T = q.shape[1]
    s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    return softmax(s) @ v


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
        o = attention(q, k, v).transpose(1, 0, 2).reshape(T, d)
        x = x + o @ w[b + "attn.c_proj.weight"] + w[b + "attn.c_proj.bias"]
        m = layer_norm(x, w[b + "ln_2.weight"], w[b + "ln_2.bias"], eps) @ w[b + "mlp.c_fc.weight"] + w[b + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))  # gelu_new
        x = x + m @ w[b + "mlp.c_proj.weight"] + w[b + "mlp.c_proj.bias"]
        hs.append(x)
    return np.stack(hs), w[p + "wte.weight"]


def rope_inv_freq(c):
    rp, dh = c["rope_parameters"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, dh, 2) / dh)
    if rp.get("rope_type", "default") == "llama3":
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
    return inv


def llama(c, w, ids):
    T, d, H, KV = len(ids), c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    dh, eps = c.get("head_dim") or d // H, c["rms_norm_eps"]
    ang = np.arange(T)[:, None] * rope_inv_freq(c)[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [heads, T, dh], rotate_half convention
        rot = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
        return x * cos + rot * sin

    def lin(x, name):
        y = x @ w[name + ".weight"].T  # nn.Linear: [out, in]
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids]
    hs = [x]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a = rms_norm(x, w[b + "input_layernorm.weight"], eps)
        q = rope(lin(a, b + "self_attn.q_proj").reshape(T, H, dh).transpose(1, 0, 2))
        k = rope(lin(a, b + "self_attn.k_proj").reshape(T, KV, dh).transpose(1, 0, 2))
        v = lin(a, b + "self_attn.v_proj").reshape(T, KV, dh).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)  # head j uses kv j // (H/KV)
        x = x + lin(attention(q, k, v).transpose(1, 0, 2).reshape(T, H * dh), b + "self_attn.o_proj")
        a = rms_norm(x, w[b + "post_attention_layernorm.weight"], eps)
        g, u = lin(a, b + "mlp.gate_proj"), lin(a, b + "mlp.up_proj")
        x = x + lin(g / (1 + np.exp(-g)) * u, b + "mlp.down_proj")
        hs.append(x)
    wu = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return np.stack(hs), wu


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def main():
    worst = 0.0
    for fx in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        c = json.loads((fx / "config.json").read_text())
        w = {k: v.astype(np.float64) for k, v in load_file(fx / "model.safetensors").items()}
        r = load_file(fx / "reference.safetensors")
        ids, L = r["input_ids"], r["hidden"].shape[0] - 1
        gpt = c["model_type"] == "gpt2"
        hidden, wu = (gpt2 if gpt else llama)(c, w, ids)
        h = hidden[L]
        if gpt:
            g, bta, eps = w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], c["layer_norm_epsilon"]
            logits = layer_norm(h, g, bta, eps) @ wu.T
        else:
            g, eps = w["model.norm.weight"], c["rms_norm_eps"]
            logits = rms_norm(h, g, eps) @ wu.T
        errs = dict(hidden=rel(hidden, r["hidden"]), logits=rel(logits, r["logits"]))
        d = h.shape[-1]
        for i, t in enumerate(r["positions"]):  # closed-form Jacobian of the final norm at layer L
            x = h[t]
            if gpt:
                xc = x - x.mean()
                s = math.sqrt((xc ** 2).mean() + eps)
                xh = xc / s
                dudh = g[:, None] / s * (np.eye(d) - 1.0 / d - np.outer(xh, xh) / d)
            else:
                rr = math.sqrt((x ** 2).mean() + eps)
                dudh = g[:, None] / rr * (np.eye(d) - np.outer(x, x) / (d * rr * rr))
            J, p = wu @ dudh, softmax(logits[t])
            F = J.T @ (np.diag(p) - np.outer(p, p)) @ J
            errs[f"fisher[L,{i}]"] = rel(F, r["fisher"][L, i])
            G = np.stack([J.T @ (np.eye(len(p))[y] - p) for y in r["sample_tokens"][i]])
            errs[f"sampled[L,{i}]"] = rel(G.T @ G / len(G), r["sampled_fisher"][L, i])
        assert np.all(np.diff(r["positions"]) > 0) and r["sample_tokens"].dtype == np.int64
        print(f"{fx.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        worst = max(worst, *errs.values())
    assert worst < 1e-11, worst
    print(f"all fixtures agree with the numpy reimplementation (worst relative error {worst:.1e})")


if __name__ == "__main__":
    main()
