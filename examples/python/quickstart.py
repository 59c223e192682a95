# %% [markdown]
# # fisher-stein from Python: which directions at layer 15 steer SmolLM2's next token?
#
# A notebook-style walk-through (cells separated by `# %%`, runnable as a script or in Jupyter
# / VS Code). It uses SmolLM2-135M-Instruct, which `tools/fetch_smollm2.sh` fetches (sha256
# checked) — pass another model (directory, .gguf, or hub id `org/name`) as the first argument.
#
#     python examples/python/quickstart.py "$(tools/fetch_smollm2.sh)"
#
# The Fisher information of the next-token distribution p with respect to the residual stream
# h at layer k, position t, is F = Jᵀ(diag p − p pᵀ)J with J = ∂logits/∂h. Moving h by ε·v
# costs KL(p ‖ p(h + εv)) ≈ ½ ε² vᵀFv, so F's top eigenvectors are the directions the
# prediction is most sensitive to.

# %%
import subprocess
import sys

import numpy as np

import fisher_stein

model_path = sys.argv[1] if len(sys.argv) > 1 else subprocess.check_output(
    ["tools/fetch_smollm2.sh"], text=True
).strip()
m = fisher_stein.load(model_path)  # loaded once, resident for every call below
print(m)
print("split layers 0..=%d, e.g. %s" % (m.info["n_layers"], m.info["hooks"][15]))

# %% [markdown]
# ## The exact Fisher at the last position, layer 15 (TransformerLens: blocks.15.hook_resid_pre)

# %%
text = "The capital of France is"
print("tokens:", m.tokenize(text))
r = m.fisher(text=text, layers="blocks.15.hook_resid_pre", estimator="exact", directions=2)
F = r.fisher[0]  # (576, 576) float32
eigenvalues = np.linalg.eigvalsh(F.astype(np.float64))[::-1]
print("F:", F.shape, F.dtype, "trace %.4e" % np.trace(F), "entropy %.4f nats" % r.entropy[0])
print("top eigenvalues:", np.array2string(eigenvalues[:3], precision=4))
assert np.allclose(eigenvalues[:2], r.eigenvalues[0][:2], rtol=1e-4)

# %% [markdown]
# ## What the top direction does: tokens pushed up by +v and by −v, and the KL check

# %%
v1 = r.directions[0][0]
# Token strings are quoted as the command line prints them; dp = ∂p_y/∂ε along v.
print("+v pushes up:", ", ".join("%s (%+.3f)" % (t["token"], t["dp"]) for t in v1["up"][:3]))
print("−v pushes up:", ", ".join("%s (%+.3f)" % (t["token"], t["dp"]) for t in v1["down"][:3]))
print("KL(p‖p(h+εv)) %.4e vs ½ε²vᵀFv %.4e" % (v1["kl"], v1["kl_quadratic"]))

# %% [markdown]
# ## The top directions matrix-free, at every position (no d×d matrix formed)

# %%
top = m.fisher(text=text, layers=15, positions="all", estimator="top-k", k=4)
print(top.eigenvalues.shape, "max residual %.1e" % top.residuals.max())
for t, lam in zip(top.positions, top.eigenvalues[:, 0]):
    print("position %d  λ1 %.3e" % (t, lam))
