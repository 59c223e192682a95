#!/usr/bin/env python3
"""Write the seed corpus of the fuzz targets into fuzz/seeds/<target>/ (standard library only).

Seeds come from the repository's fixtures (tests/fixtures: config.json files, a few tensors of a
model.safetensors) and from small files in the formats the project writes or reads (results and
mean-accumulator files, npz, a tiny Llama GGUF, tokenizer files). Re-run after changing it:
    python3 fuzz/make_seeds.py
"""
import io
import json
import os
import struct
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(ROOT, "fuzz", "seeds")

SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1}


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def pack(dtype, values):
    fmt = {"F64": "d", "I64": "q", "F32": "f", "I32": "i"}[dtype]
    return struct.pack("<%d%s" % (len(values), fmt), *values)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes) -> file bytes."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def read_safetensors(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        out.append((name, info["dtype"], info["shape"], b[base + s : base + e]))
    return out


def npz(arrays):
    """arrays: list of (name, descr, shape, raw) -> uncompressed npz bytes (as numpy writes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, descr, shape, raw in arrays:
            shp = "()" if not shape else "(%d,)" % shape[0] if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"
            h = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shp)
            h += " " * (-(10 + len(h) + 1) % 64) + "\n"
            z.writestr(name + ".npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode() + raw)
    return buf.getvalue()


# ---------------------------------------------------------------- safetensors_weights
tiny = [
    ("a.f32", "F32", [2, 2], pack("F32", [0.0, 1.0, -2.5, 0.5])),
    ("b.f16", "F16", [3], struct.pack("<3e", 1.0, -2.0, 0.25)),
    ("c.bf16", "BF16", [2], bytes([0x80, 0x3F, 0x00, 0x40])),
    ("d.f64", "F64", [1], pack("F64", [3.0])),
    ("ids", "I64", [2], pack("I64", [1, 2])),
    ("scalar", "F32", [], pack("F32", [7.0])),
]
put("safetensors_weights", "tiny.safetensors", safetensors(tiny, {"format": "pt"}))
fixture = read_safetensors(os.path.join(FIX, "llama-tiny-tied", "model.safetensors"))
small = sorted(fixture, key=lambda t: len(t[3]))[:4]
put("safetensors_weights", "llama-tiny-tied-subset.safetensors", safetensors(small))
fixture = read_safetensors(os.path.join(FIX, "gpt2-tiny-a", "model.safetensors"))
small = sorted(fixture, key=lambda t: len(t[3]))[:4]
put("safetensors_weights", "gpt2-tiny-a-subset.safetensors", safetensors(small))
put(
    "safetensors_weights",
    "model.safetensors.index.json",
    json.dumps({"metadata": {"total_size": 16}, "weight_map": {t[0]: "model-00001-of-00001.safetensors" for t in small}}),
)

# ---------------------------------------------------------------- config_json
for fx in sorted(os.listdir(FIX)):
    p = os.path.join(FIX, fx, "config.json")
    if os.path.isfile(p):
        with open(p, "rb") as f:
            put("config_json", fx + ".json", f.read())
llama3 = json.load(open(os.path.join(FIX, "llama-tiny-tied", "config.json")))
llama3["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
llama3["rope_theta"] = 500000.0
del llama3["rope_parameters"]
put("config_json", "llama3-rope.json", json.dumps(llama3))
qwen = json.load(open(os.path.join(FIX, "llama-tiny-untied", "config.json")))
qwen["model_type"] = "qwen2"
put("config_json", "qwen2.json", json.dumps(qwen))

# ---------------------------------------------------------------- tokenizer
vocab = {"a": 0, "b": 1, "\u0120": 2, "ab": 3, "\u0120ab": 4, "<|endoftext|>": 5, "H": 6, "e": 7, "l": 8, "o": 9}
merges = ["a b", "\u0120 ab"]
bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
special = [{"id": 5, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}]


def tok(model, normalizer=None, pre=None, post=None, decoder=None, added=()):
    return json.dumps(
        {"version": "1.0", "truncation": None, "padding": None, "added_tokens": list(added), "normalizer": normalizer,
         "pre_tokenizer": pre, "post_processor": post, "decoder": decoder, "model": model},
        ensure_ascii=False,
    )


put("tokenizer", "bpe-byte-level.json", tok(
    {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
     "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges},
    pre=bl, post=bl, decoder=bl, added=special))
put("tokenizer", "wordpiece.json", tok(
    {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
     "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "w": 4, "##or": 5, "##ld": 6}},
    normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None, "lowercase": True},
    pre={"type": "BertPreTokenizer"},
    post={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
          "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}},
    decoder={"type": "WordPiece", "prefix": "##", "cleanup": True}))
put("tokenizer", "unigram.json", tok(
    {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["\u2581Hello", -1.0], ["\u2581w", -2.0], ["or", -2.5], ["ld", -2.5], ["l", -3.0], ["d", -3.0]], "byte_fallback": False},
    normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    pre={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
    decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}))
put("tokenizer", "wordlevel.json", tok(
    {"type": "WordLevel", "vocab": {"[UNK]": 0, "Hello": 1, "12": 2}, "unk_token": "[UNK]"},
    pre={"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "Digits", "individual_digits": True}]}))
put("tokenizer", "vocab-nul-merges.txt", json.dumps(vocab, ensure_ascii=False) + "\0#version: 0.2\n" + "\n".join(merges) + "\n")

# ---------------------------------------------------------------- results
n, d, T = 2, 3, 4
fisher = [float(i % 5) * 0.1 for i in range(n * d * d)]
results = [
    ("fisher", "F32", [n, d, d], pack("F32", fisher)),
    ("layer", "I64", [n], pack("I64", [1, 1])),
    ("positions", "I64", [n], pack("I64", [2, 3])),
    ("sequence", "I64", [n], pack("I64", [0, 0])),
    ("token_ids", "I64", [1, T], pack("I64", [5, 6, 7, 8])),
    ("probs_entropy", "F64", [n], pack("F64", [1.5, 0.25])),
    ("eigenvalues", "F32", [n, 2], pack("F32", [0.3, 0.1, 0.2, 0.0])),
    ("eigenvectors", "F32", [n, d, 2], pack("F32", [0.5] * (n * d * 2))),
]
put("results", "fisher.safetensors", safetensors(results, {"format": "pt"}))
descr = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}
put("results", "fisher.npz", npz([(nm, descr[dt], sh, raw) for nm, dt, sh, raw in results]))
L = 2
settings = {"weights_sha256": ["00"], "d_model": d, "layers": [0, 1], "estimator": {"kind": "exact"}, "selection": {}}
mean = [
    ("layers", "I64", [L], pack("I64", [0, 1])),
    ("count", "I64", [L], pack("I64", [2, 2])),
    ("fisher_sum", "F64", [L, d, d], pack("F64", [0.0] * (L * d * d))),
    ("fisher_sum_lo", "F64", [L, d, d], pack("F64", [0.0] * (L * d * d))),
    ("fisher_mean", "F64", [L, d, d], pack("F64", [0.0] * (L * d * d))),
    ("entropy_sum", "F64", [L, 2], pack("F64", [3.0, 0.0, 2.0, 0.0])),
    ("sequences", "I64", [2], pack("I64", [0, 1])),
]
put("results", "mean.safetensors", safetensors(mean, {"format": "fisher-stein mean accumulator v1", "settings": json.dumps(settings), "shard": "0/2"}))

# ---------------------------------------------------------------- gguf
def gguf(version=3, dtype="F32"):
    """A tiny Llama GGUF: d = 8, 2 heads, 1 layer, ffn 16, 10 tokens, gpt2 tokenizer."""
    L = "<Q" if version >= 2 else "<I"

    def s(x):
        x = x.encode()
        return struct.pack(L, len(x)) + x

    def kv(key, vt, payload):
        return s(key) + struct.pack("<I", vt) + payload

    toks = list(vocab)
    md = [
        kv("general.architecture", 8, s("llama")),
        kv("general.alignment", 4, struct.pack("<I", 32)),
        kv("llama.embedding_length", 4, struct.pack("<I", 8)),
        kv("llama.feed_forward_length", 4, struct.pack("<I", 16)),
        kv("llama.block_count", 4, struct.pack("<I", 1)),
        kv("llama.attention.head_count", 4, struct.pack("<I", 2)),
        kv("llama.attention.head_count_kv", 4, struct.pack("<I", 2)),
        kv("llama.rope.dimension_count", 4, struct.pack("<I", 4)),
        kv("llama.context_length", 4, struct.pack("<I", 64)),
        kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
        kv("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        kv("tokenizer.ggml.model", 8, s("gpt2")),
        kv("tokenizer.ggml.tokens", 9, struct.pack("<I", 8) + struct.pack(L, len(toks)) + b"".join(s(t) for t in toks)),
        kv("tokenizer.ggml.merges", 9, struct.pack("<I", 8) + struct.pack(L, len(merges)) + b"".join(s(m) for m in merges)),
        kv("tokenizer.ggml.token_type", 9, struct.pack("<I", 5) + struct.pack(L, len(toks)) + struct.pack("<%di" % len(toks), *[3 if t == "<|endoftext|>" else 1 for t in toks])),
    ]
    V, D, F = len(toks), 8, 16
    shapes = [  # GGUF dims are innermost first
        ("token_embd.weight", [D, V]), ("output_norm.weight", [D]),
        ("blk.0.attn_norm.weight", [D]), ("blk.0.ffn_norm.weight", [D]),
        ("blk.0.attn_q.weight", [D, D]), ("blk.0.attn_k.weight", [D, D]),
        ("blk.0.attn_v.weight", [D, D]), ("blk.0.attn_output.weight", [D, D]),
        ("blk.0.ffn_gate.weight", [D, F]), ("blk.0.ffn_up.weight", [D, F]), ("blk.0.ffn_down.weight", [F, D]),
    ]
    infos, data = b"", b""
    for i, (name, dims) in enumerate(shapes):
        count = 1
        for x in dims:
            count *= x
        vals = [((j * 7 + i) % 11 - 5) * 0.05 + (1.0 if "norm" in name else 0.0) for j in range(count)]
        if dtype == "F32":
            raw, tid = struct.pack("<%df" % count, *vals), 0
        else:
            raw, tid = struct.pack("<%de" % count, *vals), 1
        infos += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack(L, x) for x in dims)
        infos += struct.pack("<I", tid) + struct.pack("<Q", len(data))
        data += raw + b"\0" * (-len(raw) % 32)
    head = b"GGUF" + struct.pack("<I", version) + struct.pack(L, len(shapes)) + struct.pack(L, len(md)) + b"".join(md) + infos
    head += b"\0" * (-len(head) % 32)
    return head + data


put("gguf", "tiny-llama-v3-f32.gguf", gguf(3, "F32"))
put("gguf", "tiny-llama-v2-f16.gguf", gguf(2, "F16"))
put("gguf", "tiny-llama-v1-f32.gguf", gguf(1, "F32"))
print("wrote", OUT)
