#!/usr/bin/env python3
"""Random sparse autoencoders for the `compute --sae` tests, in the two layouts fisher-stein reads,
for the repository fixture `tests/fixtures/llama-tiny-untied` (d = 48, 3 blocks):

* `tests/fixtures/sae/saelens-relu/`: SAELens layout (`cfg.json` + `sae_weights.safetensors`),
  architecture `standard` (ReLU, `apply_b_dec_to_input`), trained "on" `blocks.1.hook_resid_pre`
  (split layer 1);
* `tests/fixtures/sae/saelens-jumprelu/`: SAELens, `jumprelu`, on `blocks.1.hook_resid_post`
  (split layer 2), no `b_dec` subtraction;
* `tests/fixtures/sae/gemma-scope/layer_1/width_96/params.npz`: Gemma Scope layout (`np.savez`,
  JumpReLU), the same weights as `saelens-jumprelu` — so the two loaders must agree exactly;
  `layer_1` means the output of block 1 (`blocks.1.hook_resid_post`).

Weights are random (seeded): unit-norm decoder rows, encoder = scaled decoder transpose plus
noise, negative encoder biases so that a minority of features is active, thresholds spread so
that some active features are small. Run with numpy and safetensors installed
(`tools/requirements-ref.txt`): `python tools/make_sae_fixtures.py`.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sae"
D, N = 48, 96


def weights(seed: int):
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((N, D))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    w_enc = 0.6 * w_dec.T + 0.05 * rng.standard_normal((D, N))
    b_enc = -np.abs(rng.normal(0.0, 0.3, N))
    b_dec = 0.05 * rng.standard_normal(D)
    threshold = np.abs(rng.normal(0.0, 0.05, N))
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    return f32(w_enc), f32(b_enc), f32(w_dec), f32(b_dec), f32(threshold)


def saelens(name: str, seed: int, architecture: str, hook: str, apply_b_dec: bool):
    w_enc, b_enc, w_dec, b_dec, threshold = weights(seed)
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        tensors["threshold"] = threshold
    save_file(tensors, str(out / "sae_weights.safetensors"))
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "hook_name": hook,
        "hook_layer": int(hook.split(".")[1]),
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "activation_fn_str": "relu",
        "model_name": "llama-tiny-untied (repository fixture)",
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return w_enc, b_enc, w_dec, b_dec, threshold


def main():
    saelens("saelens-relu", 1, "standard", "blocks.1.hook_resid_pre", True)
    w_enc, b_enc, w_dec, b_dec, threshold = saelens(
        "saelens-jumprelu", 2, "jumprelu", "blocks.1.hook_resid_post", False
    )
    gs = ROOT / "gemma-scope" / "layer_1" / "width_96"
    gs.mkdir(parents=True, exist_ok=True)
    np.savez(gs / "params.npz", W_enc=w_enc, b_enc=b_enc, W_dec=w_dec, b_dec=b_dec, threshold=threshold)
    (ROOT / "VERSIONS.json").write_text(
        json.dumps({"numpy": np.__version__, "safetensors": __import__("safetensors").__version__}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
