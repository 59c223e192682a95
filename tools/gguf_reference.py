"""Independent reference for the SmolLM2-135M-Instruct GGUF (issue #5): transformers loads the
GGUF with the `gguf` package (dequantising, un-permuting q/k for rotate_half), runs the prompt
"The capital of France is" (no BOS) and records the top-10 next-token ids and probabilities in
tests/fixtures/smollm2-france-top10.json, with the versions used.

    /root/.venvs/fisher-stein-ref/bin/pip install gguf
    /root/.venvs/fisher-stein-ref/bin/python tools/gguf_reference.py "$(tools/fetch_smollm2.sh)"
"""
import importlib.metadata, json, os, sys, platform
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers, gguf
from transformers import AutoModelForCausalLM

path = sys.argv[1]
folder, name = os.path.split(path)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
model.eval()
ids = torch.tensor([[504, 3575, 282, 4649, 314]])
with torch.no_grad():
    logits = model(ids).logits[0, -1].double()
p = torch.softmax(logits, -1)
top = torch.topk(p, 10)
out = {
    "prompt": "The capital of France is",
    "input_ids": ids[0].tolist(),
    "top10_ids": top.indices.tolist(),
    "top10_probs": top.values.tolist(),
    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                 "accelerate": importlib.metadata.version("accelerate")},
    "script": "tools/gguf_reference.py",
}
dst = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2-france-top10.json")
with open(dst, "w") as f:
    json.dump(out, f, indent=2)
print(json.dumps(out, indent=2))
