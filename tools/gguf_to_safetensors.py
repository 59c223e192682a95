#!/usr/bin/env python3
"""Write a GGUF checkpoint as a Hugging Face model directory (config.json, model.safetensors in
the chosen dtype, tokenizer files), dequantised by transformers' own GGUF reader.

Used to measure loading a safetensors checkpoint of a real model (docs/PERFORMANCE.md, "The
fixed cost of a run") from the GGUFs this repository can fetch, e.g.

    tools/fetch_smollm2.sh
    /root/.venvs/fisher-stein-ref/bin/python tools/gguf_to_safetensors.py \
        ~/.cache/fisher-stein/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-bf16 --dtype bfloat16

The values are the GGUF's dequantised weights rounded to `--dtype`; the directory records the
versions it was written with in `conversion.json`.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="path to a .gguf file")
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(args.out, exist_ok=True)
    # transformers marks a GGUF-loaded model as quantised and refuses save_pretrained: write the
    # (already dequantised) tensors and the config directly.
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = args.dtype
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "conversion.json"), "w") as f:
        json.dump(
            {
                "source": os.path.basename(args.gguf),
                "dtype": args.dtype,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
