"""Quantisation fixture: one GGUF holding one tensor of every GGML type fs-checkpoint reads, written
by the `gguf` Python package, plus the package's own dequantisation of each tensor as float32.

    /root/.venvs/fisher-stein-ref/bin/python tools/make_quant_fixture.py    # from the repo root, ~1 s

Writes tests/fixtures/quants/{quants.gguf, reference.safetensors, VERSIONS.json}; the Rust test
crates/fs-checkpoint/tests/dequant_reference.rs reads the GGUF with fs-checkpoint and compares
every tensor bit for bit with reference.safetensors. Seeded: a rerun gives byte-identical files.

How each tensor's bytes are made (gguf 0.19.0; recorded per type in VERSIONS.json):
* F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: `gguf.quants.quantize(data, type)` of seeded
  random f32 data with a realistic spread (see `make_data`).
* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: the package can only dequantise these, so the blocks are built
  here: random quant and scale bytes, super-block scales random f16 of sane size (one all-zero
  block, one with a subnormal `d`, some with negative `d`/`dmin`).
* Q8_1, Q8_K: the package has no quantiser and no dequantiser; the blocks are built here from the
  same data the way ggml's `quantize_row_q8_1_ref` / `quantize_row_q8_K_ref` lay them out.

The reference for every type but Q8_1 and Q8_K is `gguf.quants.dequantize` applied to the tensor
bytes as `gguf.GGUFReader` reads them back from the written file. Q8_1: gguf 0.19.0's
`GGML_QUANT_SIZES` gives it 40-byte blocks (the old ggml layout with f32 `d` and `s`), while ggml
(`block_q8_1`: f16 `d`, f16 `s`, 32 `i8`), candle and fs-checkpoint use 36 bytes. The tensor is
written in the 36-byte layout (`raw_shape` tells the writer the element count), and its reference
is the package's Q8_0 dequantiser applied to the blocks with `s` removed (same `y = qs * d`).
Q8_K: `y = d * qs` computed here in numpy (f32 times f32, one rounding, as ggml does).
"""
import importlib.metadata
import json
import os
import platform
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

SEED = 20260611
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "quants")
SHAPE = (4, 1024)  # 16 K-quant super-blocks, 128 legacy blocks per tensor

# Every type fs-checkpoint reads (GgmlType::ALL), in GGUF id order; the tensor is named as the type.
TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "BF16"]
PACKAGE_QUANTISED = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
RANDOM_BLOCKS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Some tensors get another rank, to exercise the reader's shape handling too.
SHAPES = {"Q6_K": (2, 2, 1024), "Q8_K": (4096,), "BF16": (2, 2048)}


def make_data(rng, shape):
    """Four rows of 1024 with the spread of real weights: N(0,1); small N(0, 0.02^2) weights with
    a few large outliers; an all-zero K-block, a constant block, an all-negative block and
    heavy-tailed t(3) values; blocks whose scale varies from 1e-4 to 10."""
    x = np.empty((4, 1024), dtype=np.float64)
    x[0] = rng.standard_normal(1024)
    x[1] = 0.02 * rng.standard_normal(1024)
    idx = rng.choice(1024, size=8, replace=False)
    x[1, idx] = rng.uniform(1.0, 4.0, size=8) * rng.choice([-1.0, 1.0], size=8)
    x[2] = 3.0 * rng.standard_t(3, size=1024)
    x[2, :256] = 0.0  # a whole K super-block (and 8 legacy blocks) of zeros
    x[2, 256:288] = 0.75  # min == max
    x[2, 288:320] = -np.abs(rng.standard_normal(32))
    scales = 10.0 ** rng.uniform(-4.0, 1.0, size=32)
    x[3] = rng.standard_normal(1024) * np.repeat(scales, 32)
    return x.astype(np.float32).reshape(shape)


def f16_bytes(v):
    return np.asarray(v, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_k_blocks(rng, name, n_blocks):
    """Valid random blocks: every quant/scale byte random, super-block scales f16 in
    ±[1e-4, 1e-1] (log-uniform; d negative in a quarter of the blocks, dmin in an eighth).
    Block 0 is all zero bytes, block 1 has the subnormal d = 2^-20 (and dmin = 2^-17)."""
    size = gguf.GGML_QUANT_SIZES[getattr(T, name)][1]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = 10.0 ** rng.uniform(-4.0, -1.0, n_blocks) * np.where(rng.random(n_blocks) < 0.25, -1.0, 1.0)
    dmin = 10.0 ** rng.uniform(-4.0, -1.0, n_blocks) * np.where(rng.random(n_blocks) < 0.125, -1.0, 1.0)
    d[1], dmin[1] = 2.0**-20, 2.0**-17
    d, dmin = f16_bytes(d), f16_bytes(dmin)
    if name == "Q2_K":  # scales[16] qs[64] d dmin
        b[:, 80:82], b[:, 82:84] = d, dmin
    elif name == "Q3_K":  # hmask[32] qs[64] scales[12] d
        b[:, 108:110] = d
    elif name in ("Q4_K", "Q5_K"):  # d dmin scales[12] (qh[32]) qs[128]
        b[:, 0:2], b[:, 2:4] = d, dmin
    elif name == "Q6_K":  # ql[128] qh[64] scales[16] (i8) d
        b[:, 208:210] = d
    else:
        raise ValueError(name)
    b[0] = 0
    return b


def q8_1_blocks(data):
    """ggml's quantize_row_q8_1_ref layout (36 bytes): f16 d = amax/127, f16 s = d * sum(qs),
    i8 qs = round(x / d). The quants come from the package's Q8_0 quantiser (same d and qs)."""
    q8_0 = gguf.quants.quantize(data, T.Q8_0).reshape(-1, 34)
    d = q8_0[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = q8_0[:, 2:].view(np.int8)
    s = d * qs.astype(np.float32).sum(axis=1)
    return np.concatenate([q8_0[:, 0:2], f16_bytes(s), q8_0[:, 2:]], axis=1)


def q8_k_blocks(data):
    """ggml's quantize_row_q8_K_ref layout (292 bytes): f32 d, i8 qs[256], i16 bsums[16]."""
    x = data.reshape(-1, 256).astype(np.float32)
    imax = np.abs(x).argmax(axis=1)
    mx = x[np.arange(len(x)), imax]
    out = np.zeros((len(x), 292), dtype=np.uint8)
    for i, (row, m) in enumerate(zip(x, mx)):
        if m == 0:
            continue  # d = 0, qs = 0, bsums = 0
        iscale = np.float32(-128.0) / m
        qs = np.minimum(127, np.rint(iscale * row)).astype(np.int8)
        out[i, 0:4] = np.array([1.0 / iscale], dtype=np.float32).view(np.uint8)
        out[i, 4:260] = qs.view(np.uint8)
        bsums = qs.astype(np.int16).reshape(16, 16).sum(axis=1).astype("<i2")
        out[i, 260:292] = bsums.view(np.uint8)
    return out


def build(rng):
    """name -> (tensor passed to the writer, raw_dtype or None, raw_shape or None, element shape,
    how the bytes were made)."""
    out = {}
    for name in TYPES:
        shape = SHAPES.get(name, SHAPE)
        qt = getattr(T, name)
        n = int(np.prod(shape))
        if name in PACKAGE_QUANTISED:
            data = make_data(rng, SHAPE).reshape(shape)
            q = gguf.quants.quantize(data, qt)
            raw = None if name in ("F32", "F16") else qt
            out[name] = (q, raw, None, shape, "gguf.quants.quantize of seeded random f32 data")
        elif name in RANDOM_BLOCKS:
            blocks = random_k_blocks(rng, name, n // 256)
            q = blocks.reshape(*shape[:-1], -1)
            out[name] = (q, qt, None, shape, "random valid blocks built by this script")
        elif name == "Q8_1":
            data = make_data(rng, SHAPE).reshape(shape)
            blocks = q8_1_blocks(data)
            # int8, not uint8: the writer then takes raw_shape as the element shape instead of
            # converting a byte shape with its (40-byte) Q8_1 size.
            q = blocks.reshape(*shape[:-1], -1).view(np.int8)
            out[name] = (q, qt, shape, shape, "ggml quantize_row_q8_1_ref layout (36-byte blocks) built by this script")
        elif name == "Q8_K":
            data = make_data(rng, SHAPE).reshape(shape)
            blocks = q8_k_blocks(data)
            q = blocks.reshape(*shape[:-1], -1)
            out[name] = (q, qt, None, shape, "ggml quantize_row_q8_K_ref layout built by this script")
    return out


def reference(name, raw_bytes, shape):
    """The package's dequantisation of one tensor's bytes, as float32 of the element shape."""
    b = np.ascontiguousarray(raw_bytes).view(np.uint8).reshape(-1)
    if name == "Q8_1":
        blocks = b.reshape(-1, 36)
        as_q8_0 = np.ascontiguousarray(np.concatenate([blocks[:, 0:2], blocks[:, 4:]], axis=1))
        y = gguf.quants.dequantize(as_q8_0, T.Q8_0)
    elif name == "Q8_K":
        blocks = b.reshape(-1, 292)
        d = blocks[:, 0:4].copy().view(np.float32)  # (n, 1)
        qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
        y = d * qs
    elif name == "F32":
        y = gguf.quants.dequantize(b, T.F32)
    elif name == "F16":
        y = gguf.quants.dequantize(b.view(np.float16), T.F16)
    else:
        y = gguf.quants.dequantize(b, getattr(T, name))
    y = np.asarray(y)
    assert y.dtype == np.float32, (name, y.dtype)
    return np.ascontiguousarray(y.reshape(shape))


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(SEED)
    tensors = build(rng)

    path = os.path.join(OUT, "quants.gguf")
    w = gguf.GGUFWriter(path, arch="fs-quant-fixture")
    w.add_array("fixture.types", TYPES)
    w.add_string("fixture.script", "tools/make_quant_fixture.py")
    for name in TYPES:
        q, raw, raw_shape, _, _ = tensors[name]
        w.add_tensor(name, q, raw_shape=raw_shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read the file back with the package's own reader; take each tensor's bytes from there.
    r = gguf.GGUFReader(path)
    found = {t.name: t for t in r.tensors}
    assert list(found) == TYPES, list(found)
    refs, meta = {}, {}
    for name in TYPES:
        q, _, _, shape, how = tensors[name]
        t = found[name]
        assert t.tensor_type == getattr(T, name), (name, t.tensor_type)
        assert tuple(int(v) for v in reversed(t.shape)) == tuple(shape), (name, t.shape, shape)
        want = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
        if name == "Q8_1":
            # GGUFReader sizes Q8_1 tensors with its 40-byte block: take the 36-byte blocks from
            # the tensor's offset ourselves.
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.data_offset, shape=(want.size,))
        else:
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert raw.size == want.size and np.array_equal(raw, want), name
        y = reference(name, np.array(raw), shape)
        assert np.isfinite(y).all(), name
        refs[name] = y
        if name in PACKAGE_QUANTISED:
            src = "gguf.quants.dequantize"
        elif name == "Q8_1":
            src = "gguf.quants.dequantize(Q8_0) of the blocks without s (gguf has no Q8_1 dequantiser)"
        elif name == "Q8_K":
            src = "numpy d * qs in this script (gguf has no Q8_K dequantiser)"
        else:
            src = "gguf.quants.dequantize"
        meta[name] = {
            "shape": list(shape),
            "bytes": int(want.size),
            "bytes_from": how,
            "reference": src,
            "nonzero": int(np.count_nonzero(y)),
            "distinct": int(np.unique(y).size),
            "max_abs": float(np.abs(y).max()),
        }
    save_file(refs, os.path.join(OUT, "reference.safetensors"))

    versions = {
        "script": "tools/make_quant_fixture.py",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "safetensors": importlib.metadata.version("safetensors"),
        "seed": SEED,
        "types": TYPES,
        "tensors": meta,
    }
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2)
        f.write("\n")
    for name in TYPES:
        m = meta[name]
        print(f"{name:5} {str(m['shape']):16} {m['bytes']:6} B  nonzero {m['nonzero']:4}  "
              f"distinct {m['distinct']:4}  max|y| {m['max_abs']:.4g}  ref: {m['reference']}")
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    sys.exit(main())
