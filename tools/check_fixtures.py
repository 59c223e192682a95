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
# GGUF copies whose GGUF-only reading (llama.cpp's semantics) differs from the reference (tools/README.md)
GGUF_DIVERGES = {"gemma2-tiny", "gemma3-tiny", "mistral-window-tiny", "phi3-tiny", "pythia-tiny"}
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
    if "inv_freq" in rp:  # an explicit table (llama.cpp's rope_freqs view of a GGUF)
        return np.asarray(rp["inv_freq"], dtype=np.float64)
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


# ---------------------------------------------------------------- model.gguf (llama.cpp convert_hf_to_gguf.py)
def read_gguf(path):
    """Minimal GGUF v3 reader: (metadata dict, {name: np.ndarray}) for F32 tensors (ggml dims reversed)."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = np.frombuffer(buf, dtype=fmt, count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return v.item()

    def string():
        nonlocal pos
        n = take("<u8")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    scalar = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<u4"), take("<u8")
            return [value(et) for _ in range(n)]
        v = take(scalar[t])
        return bool(v) if t == 7 else v

    assert buf[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<u4"), take("<u8"), take("<u8")
    assert version == 3
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(take("<u4"))
    infos = []
    for _ in range(n_tensors):
        name, nd = string(), take("<u4")
        dims = [take("<u8") for _ in range(nd)]
        infos.append((name, dims, take("<u4"), take("<u8")))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, off in infos:
        assert ttype == 0, (name, ttype)  # F32 only in these fixtures
        n = int(np.prod(dims))
        tensors[name] = np.frombuffer(buf, dtype="<f4", count=n, offset=start + off).reshape(dims[::-1])
    return meta, tensors


def gguf_name_map(c):
    """HF key -> (GGUF name, transform) following convert_hf_to_gguf.py."""
    mt, L = c["model_type"], c["num_hidden_layers"]
    gemma = mt in ("gemma2", "gemma3_text")
    plus1 = lambda x: x + np.float32(1)  # noqa: E731  Gemma RMSNorm weights are stored as 1 + w
    same = lambda x: x  # noqa: E731
    H, KV = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]

    def permute(x, heads):  # llama arch only: HF rotate_half rows -> GGML interleaved pairs, per head
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def neox_qkv(x):  # [heads, 3, head_size] along the output axis -> [q | k | v]
        return x.reshape(H, 3, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    m = {}
    if mt == "gpt_neox":
        m.update({"gpt_neox.embed_in.weight": ("token_embd.weight", same), "embed_out.weight": ("output.weight", same),
                  "gpt_neox.final_layer_norm.weight": ("output_norm.weight", same),
                  "gpt_neox.final_layer_norm.bias": ("output_norm.bias", same)})
        per = {"input_layernorm": ("attn_norm", same), "post_attention_layernorm": ("ffn_norm", same),
               "attention.query_key_value": ("attn_qkv", neox_qkv), "attention.dense": ("attn_output", same),
               "mlp.dense_h_to_4h": ("ffn_up", same), "mlp.dense_4h_to_h": ("ffn_down", same)}
        for i in range(L):
            for hf, (gg, f) in per.items():
                for wb in ("weight", "bias"):
                    m[f"gpt_neox.layers.{i}.{hf}.{wb}"] = (f"blk.{i}.{gg}.{wb}", f)
        return m
    norm = plus1 if gemma else same
    m.update({"model.embed_tokens.weight": ("token_embd.weight", same), "model.norm.weight": ("output_norm.weight", norm),
              "lm_head.weight": ("output.weight", same)})
    llama = mt in ("llama", "mistral")
    per = {"input_layernorm": ("attn_norm", norm),
           "post_attention_layernorm": ("post_attention_norm" if gemma or mt == "olmo2" else "ffn_norm", norm),
           "pre_feedforward_layernorm": ("ffn_norm", norm), "post_feedforward_layernorm": ("post_ffw_norm", norm),
           "self_attn.q_proj": ("attn_q", (lambda x: permute(x, H)) if llama else same),
           "self_attn.k_proj": ("attn_k", (lambda x: permute(x, KV)) if llama else same),
           "self_attn.v_proj": ("attn_v", same), "self_attn.o_proj": ("attn_output", same),
           "self_attn.q_norm": ("attn_q_norm", norm), "self_attn.k_norm": ("attn_k_norm", norm),
           "self_attn.qkv_proj": ("attn_qkv", same),  # Phi-3: kept fused, [q | k | v]
           "mlp.gate_proj": ("ffn_gate", same), "mlp.up_proj": ("ffn_up", same),
           "mlp.gate_up_proj": ("ffn_up", same),  # Phi-3: kept fused, [gate | up]
           "mlp.down_proj": ("ffn_down", same)}
    for i in range(L):
        for hf, (gg, f) in per.items():
            for wb in ("weight", "bias"):
                m[f"model.layers.{i}.{hf}.{wb}"] = (f"blk.{i}.{gg}.{wb}", f)
    return m


def check_gguf(fx, c, w32):
    """Every GGUF tensor is the safetensors tensor under the converter's conventions (bit for bit), and
    the metadata says what config.json says (where GGUF has a key for it)."""
    meta, g = read_gguf(fx / "model.gguf")
    arch = meta["general.architecture"]
    mt = c["model_type"]
    assert arch == {"gemma3_text": "gemma3", "gpt_neox": "gptneox", "mistral": "llama"}.get(mt, mt), arch
    names = gguf_name_map(c)
    seen = set()
    for k, x in w32.items():
        gname, f = names[k]
        assert np.array_equal(g[gname], f(x)), (fx.name, k, gname)
        seen.add(gname)
    extra = set(g) - seen
    rp = c.get("rope_parameters") or {}
    if rp.get("rope_type") == "llama3":  # llama.cpp divides inv_freq by rope_freqs (the llama3 factors)
        assert extra == {"rope_freqs.weight"}, extra
        dh = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        base_inv = 1.0 / float(rp["rope_theta"]) ** (np.arange(0, dh, 2) / dh)
        assert np.allclose(base_inv / g["rope_freqs.weight"], inv_freq(rp, dh), rtol=1e-6)
    else:
        assert not extra, extra
    V, L = c["vocab_size"], c["num_hidden_layers"]
    a = lambda k: meta[f"{arch}.{k}"]  # noqa: E731
    assert a("block_count") == L and a("embedding_length") == c["hidden_size"]
    assert a("feed_forward_length") == c["intermediate_size"] and a("attention.head_count") == c["num_attention_heads"]
    assert a("context_length") == c["max_position_embeddings"]
    if mt == "gpt_neox":
        assert "attention.head_count_kv" not in {k.split(".", 1)[1] for k in meta if k.startswith(arch)}
        assert np.isclose(a("attention.layer_norm_epsilon"), c["layer_norm_eps"], rtol=1e-6)
        assert a("use_parallel_residual") == c["use_parallel_residual"]
        hs = c["hidden_size"] // c["num_attention_heads"]
        assert a("rope.dimension_count") == int(hs * rp["partial_rotary_factor"])
        assert f"{arch}.rope.freq_base" not in meta  # not written: llama.cpp default 10000
    else:
        assert a("attention.head_count_kv") == c["num_key_value_heads"]
        assert np.isclose(a("attention.layer_norm_rms_epsilon"), c["rms_norm_eps"], rtol=1e-6)
    if mt == "gemma2":
        assert a("attn_logit_softcapping") == c["attn_logit_softcapping"]
        assert a("final_logit_softcapping") == c["final_logit_softcapping"]
        assert a("attention.sliding_window") == c["sliding_window"] and a("attention.key_length") == c["head_dim"]
        assert f"{arch}.rope.freq_base" not in meta and rp["rope_theta"] == 10000.0  # llama.cpp default
    elif mt == "gemma3_text":
        full, slide = rp["full_attention"], rp["sliding_attention"]
        assert a("rope.freq_base") == full["rope_theta"] and a("rope.freq_base_swa") == slide["rope_theta"]
        assert a("rope.scaling.type") == full["rope_type"] == "linear" and a("rope.scaling.factor") == full["factor"]
        assert a("attention.sliding_window") == c["sliding_window"] and a("attention.key_length") == c["head_dim"]
        assert f"{arch}.attention.sliding_window_pattern" not in meta  # layer_types not carried (llama.cpp: 6)
    elif mt in ("llama", "mistral", "qwen3", "olmo2", "phi3"):
        assert a("rope.freq_base") == rp["rope_theta"]
        if mt in ("llama", "mistral"):
            assert a("rope.dimension_count") == c["head_dim"] and a("vocab_size") == V
            assert f"{arch}.attention.sliding_window" not in meta  # Mistral's window is not carried
        if mt == "phi3":
            dh = c["hidden_size"] // c["num_attention_heads"]
            assert a("rope.dimension_count") == int(rp["partial_rotary_factor"] * c["hidden_size"]) // c["num_attention_heads"]
            assert a("rope.dimension_count") == int(dh * rp["partial_rotary_factor"])
            assert a("attention.sliding_window") == c["sliding_window"]
            assert a("rope.scaling.original_context_length") == c["original_max_position_embeddings"]
        if mt == "qwen3":
            assert a("attention.key_length") == c["head_dim"]
    assert meta["general.file_type"] == 0 if "general.file_type" in meta else True
    toks = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2" and len(toks) == V
    assert toks[-1] == "<|endoftext|>" and meta["tokenizer.ggml.eos_token_id"] == V - 1
    assert all(m.count(" ") == 1 and m.replace(" ", "") in toks for m in meta["tokenizer.ggml.merges"])
    return len(g)


def llama_cpp_view(meta, g):
    """(config dict, HF-named float64 weights) as llama.cpp would run the GGUF: hyper-parameters from the
    GGUF alone plus llama.cpp's defaults and fixed choices at the pinned commit, read from its source
    (src/models/*.cpp), not by running it: attention scale 1/sqrt(key_length) (Gemma; the 27B exception
    does not apply); Gemma-2 sliding pattern 2, Gemma-3 pattern 6 unless attention.sliding_window_pattern;
    Phi-3 SWA disabled; no window for llama; GPT-NeoX GELU = tanh form; rope.freq_base default 10000."""
    arch = meta["general.architecture"]
    a = lambda k, dflt=None: meta.get(f"{arch}.{k}", dflt)  # noqa: E731
    d, H, L = a("embedding_length"), a("attention.head_count"), a("block_count")
    mt = {"gemma3": "gemma3_text", "gptneox": "gpt_neox"}.get(arch, arch)
    c = dict(model_type=mt, hidden_size=d, num_attention_heads=H, num_hidden_layers=L,
             num_key_value_heads=a("attention.head_count_kv", H), intermediate_size=a("feed_forward_length"),
             max_position_embeddings=a("context_length"), vocab_size=len(meta["tokenizer.ggml.tokens"]),
             tie_word_embeddings="output.weight" not in g)
    dh = a("attention.key_length", d // H)
    theta = a("rope.freq_base", 10000.0)
    rot = a("rope.dimension_count", dh)
    if mt == "gpt_neox":
        c.update(layer_norm_eps=a("attention.layer_norm_epsilon"), hidden_act="gelu_new",
                 use_parallel_residual=a("use_parallel_residual"),
                 rope_parameters=dict(rope_theta=theta, partial_rotary_factor=rot / (d // H)))
    else:
        c.update(head_dim=dh, rms_norm_eps=a("attention.layer_norm_rms_epsilon"), hidden_act="silu",
                 rope_parameters=dict(rope_theta=theta, partial_rotary_factor=rot / dh))
    if mt in ("gemma2", "gemma3_text"):
        pattern = 2 if mt == "gemma2" else 6
        c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=dh,
                 sliding_window=a("attention.sliding_window"),
                 layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L)],
                 attn_logit_softcapping=a("attn_logit_softcapping"), final_logit_softcapping=a("final_logit_softcapping"))
        if mt == "gemma3_text":
            full = dict(rope_theta=theta, rope_type="default")
            if a("rope.scaling.type") == "linear":
                full.update(rope_type="linear", factor=a("rope.scaling.factor"))
            c["rope_parameters"] = dict(full_attention=full,
                                        sliding_attention=dict(rope_theta=a("rope.freq_base_swa", theta)))
    if mt == "phi3":
        c["sliding_window"] = None  # "Phi SWA is currently disabled"
    # weights back to HF names: undo the converter's transforms
    H_, KV = c["num_attention_heads"], c["num_key_value_heads"]

    def unpermute(x, heads):
        return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def neox_unqkv(x):
        return x.reshape(3, H_, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    w = {}
    for hf, (gname, _) in gguf_name_map(c).items():
        if gname not in g:
            continue
        x = g[gname].astype(np.float64)
        if mt in ("llama", "mistral") and ".self_attn.q_proj." in hf:
            x = unpermute(x, H_)
        elif mt in ("llama", "mistral") and ".self_attn.k_proj." in hf:
            x = unpermute(x, KV)
        elif mt == "gpt_neox" and ".query_key_value." in hf:
            x = neox_unqkv(x)
        elif mt in ("gemma2", "gemma3_text") and hf.endswith("norm.weight"):
            x = g[gname] - np.float32(1)  # the forward adds 1 back
            x = x.astype(np.float64)
        w[hf] = x
    if "rope_freqs.weight" in g:  # llama3: llama.cpp divides each inv_freq by its factor
        c["rope_parameters"]["inv_freq"] = (1.0 / theta ** (np.arange(0, dh, 2) / dh)) / g["rope_freqs.weight"]
    return c, w


def gguf_only_logits(fx):
    meta, g = read_gguf(fx / "model.gguf")
    c, w = llama_cpp_view(meta, g)
    ids = load_file(fx / "reference.safetensors")["input_ids"]
    hidden = {"gpt_neox": gpt_neox}.get(c["model_type"], decoder)(c, w, ids)
    nf, wu = final_norm(c, w), unembedding(c, w)
    pre = np.stack([nf(h)[0] for h in hidden[-1]]) @ wu.T
    cap = c.get("final_logit_softcapping")
    return pre if cap is None else cap * np.tanh(pre / cap)


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
    if (fx / "model.gguf").is_file():
        errs["gguf tensors"] = check_gguf(fx, c, load_file(fx / "model.safetensors"))
        errs["gguf-only"] = rel(gguf_only_logits(fx), r["logits"])
    return errs


def main():
    worst = 0.0
    fixtures = sorted(p for p in ROOT.iterdir()
                      if all((p / f).is_file() for f in ("config.json", "model.safetensors", "reference.safetensors")))
    for fx in fixtures:
        errs = check(fx)
        n_gguf, gguf_only = errs.pop("gguf tensors", None), errs.pop("gguf-only", None)
        print(f"{fx.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        if n_gguf:
            print(f"    model.gguf: {n_gguf} tensors bit-identical under the converter's conventions; forward with "
                  f"llama.cpp's reading of the GGUF alone: logits rel. error {gguf_only:.1e}"
                  + ("" if fx.name in GGUF_DIVERGES else " (= reference)"))
            assert (gguf_only > 1e-6) == (fx.name in GGUF_DIVERGES), (fx.name, gguf_only)
        worst = max(worst, *errs.values())
    assert worst < 1e-11, worst
    print(f"all {len(fixtures)} fixtures agree with the numpy reimplementation (worst relative error {worst:.1e})")


if __name__ == "__main__":
    main()
