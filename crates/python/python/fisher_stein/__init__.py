"""Fisher information of a language model's next-token distribution with respect to an
intermediate activation, computed by the fisher-stein Rust engines, returned as numpy arrays.

At split layer ``k`` and position ``t`` (``h = H_k[t]``, the residual stream entering block
``k``; TransformerLens ``blocks.k.hook_resid_pre``)::

    p = softmax(z(h))                                   next-token distribution, V logits
    J = dz/dh                                           V x d logit Jacobian
    F = E_{y~p}[grad_h log p_y  grad_h log p_y^T] = J^T (diag p - p p^T) J     (d x d, PSD)

The top eigenvectors of ``F`` are the directions in activation space the prediction is most
sensitive to: moving ``h`` by ``eps * v`` changes the distribution by
``KL(p || p(h + eps v)) ~ 1/2 eps^2 v^T F v``.

Quick start::

    import fisher_stein
    m = fisher_stein.load("path/to/model")            # directory, .gguf file, or org/name
    r = m.fisher(text="The capital of France is", layers=15, estimator="exact")
    r.fisher.shape                                    # (1, d, d) float32
    r.eigenvalues[0][:3], r.directions[0][0]["up"]    # top eigenpairs, decoded directions

A computation runs the command line's own code (``fisher-stein compute``) on the loaded model,
so results equal the command line's bit for bit, and errors carry its one-line messages:
``ValueError`` for bad input, ``FileNotFoundError`` for a missing model or file.
``KeyboardInterrupt`` (Ctrl-C) stops a computation at its next batch of positions; the GIL is
released while it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _native

__all__ = ["load", "load_results", "backends", "Model", "Results", "__version__"]

__version__: str = _native.__version__

LayerArg = Union[int, str]
PositionArg = Union[int, str, Sequence[int]]

_ESTIMATORS = ("exact", "sampled", "closed-form", "predictive", "top-k")


def backends() -> List[str]:
    """The engines compiled into this build: a subset of ``["candle", "burn", "dfdx"]``."""
    return list(_native.backends())


def load(
    model: Union[str, os.PathLike],
    backend: str = "candle",
    device: str = "cpu",
    batch_size: Optional[int] = None,
) -> "Model":
    """Load a model once and keep it resident for :meth:`Model.fisher` calls.

    ``model``: a directory with ``config.json`` + safetensors weights, a ``.gguf`` file, or a
    Hugging Face hub id ``org/name[@revision]`` (downloaded into the HF cache when missing,
    unless ``HF_HUB_OFFLINE=1``). ``backend``: ``"candle"`` (default), ``"burn"`` or ``"dfdx"``
    (see :func:`backends`). ``device``: ``"cpu"``, ``"cuda:N"`` or ``"wgpu"`` where the build
    has that engine's GPU feature. ``batch_size``: positions per batched readout pass (default:
    what fits about 1 GiB).
    """
    if not isinstance(backend, str) or not isinstance(device, str):
        raise ValueError("backend and device must be strings, e.g. backend='candle', device='cpu'")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size {batch_size!r}: give a positive integer, or None")
    spec = os.fspath(model)
    return Model(_native.Model(spec, backend, device, batch_size), spec, backend, device)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _layers_arg(layers: Union[LayerArg, Sequence[LayerArg], None]) -> str:
    if layers is None:
        raise ValueError(
            "give layers: an index (0 = embeddings), a TransformerLens hook name such as "
            "'blocks.6.hook_resid_pre', a list of them, or 'all'"
        )
    if isinstance(layers, str) or _is_int(layers):
        items: List[Any] = [layers]
    else:
        items = list(layers)
    if not items:
        raise ValueError("layers is empty: give at least one layer")
    out = []
    for x in items:
        if _is_int(x):
            if x < 0:
                raise ValueError(f"layer {x}: split layers are 0..=n_layers (see Model.info)")
            out.append(str(int(x)))
        elif isinstance(x, str):
            if "," in x and len(items) > 1:
                raise ValueError(f"layer {x!r}: give one layer per list item")
            out.append(x.strip())
        else:
            raise ValueError(f"layer {x!r}: give an int or a hook name string")
    return ",".join(out)


def _positions_arg(positions: PositionArg) -> str:
    if isinstance(positions, str):
        return positions
    if _is_int(positions):
        return str(int(positions))
    items = list(positions)
    if not items or not all(_is_int(p) for p in items):
        raise ValueError(
            f"positions {positions!r}: give 'last', 'all', an int, a list of ints, "
            "or a string such as '0,3,10..12' (negative = from the end)"
        )
    return ",".join(str(int(p)) for p in items)


@dataclass
class Results:
    """Fisher matrices and what comes with them, one row per (sequence, layer, position).

    ``fisher``: ``[N, d, d]`` float32 (``None`` for ``estimator="top-k"``, which never forms F);
    ``layers``, ``positions``, ``sequences``: ``[N]`` int64, the row's split layer, position and
    sequence index; ``hooks``: the TransformerLens name of each analysed layer
    (``metadata["hooks"]``, parallel to ``metadata["layers"]``); ``token_ids``: one int64 array
    per sequence; ``entropy``: ``[N]`` float64, the next-token entropy ``-sum p log p`` (nats);
    ``eigenvalues`` ``[N, K]`` and ``eigenvectors`` ``[N, d, K]`` (float32) where stored
    (``eig_top``, ``directions``, top-k); ``trace``, ``residuals`` (top-k:
    ``||F v - lambda v|| / lambda_1`` per pair) when computed; ``directions``: per row, the
    decoded top directions (tokens that ``+v`` and ``-v`` push up, ``dp``, the KL check
    ``KL(p || p(h + eps v))`` vs ``1/2 eps^2 v^T F v``) when ``directions > 0``; ``sae``: per
    row, the SAE read-out (active features, sensitivities, second-order and measured ablation
    KL, eigenvectors in feature space) with ``sae=``; ``mean``: the
    arrays of ``mean.safetensors`` (``fisher_mean`` ``[L, d, d]`` float64, ``count``, …) with
    ``mean=True``; ``arrays``: every array of the results files by name; ``metadata``: the
    run's ``metadata.json``.
    """

    fisher: Optional[np.ndarray]
    layers: np.ndarray
    positions: np.ndarray
    sequences: np.ndarray
    token_ids: List[np.ndarray]
    entropy: np.ndarray
    eigenvalues: Optional[np.ndarray]
    eigenvectors: Optional[np.ndarray]
    trace: Optional[np.ndarray]
    residuals: Optional[np.ndarray]
    directions: List[List[Dict[str, Any]]]
    sae: List[Optional[Dict[str, Any]]]
    hooks: List[str]
    mean: Optional[Dict[str, np.ndarray]]
    arrays: Dict[str, np.ndarray] = field(repr=False)
    metadata: Dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __repr__(self) -> str:
        d = self.metadata.get("d_model")
        what = "top-k eigenpairs" if self.fisher is None else "Fisher matrices"
        return (
            f"Results({len(self)} {what}, d = {d}, layers {sorted(set(self.layers.tolist()))}, "
            f"estimator {self.metadata.get('estimator', {}).get('name', '?')})"
        )


_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "U16": "<u2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file (the format: 8-byte little-endian header length,
    JSON header of name -> dtype, shape, data_offsets; then the raw little-endian data)."""
    raw = bytearray(path.read_bytes())
    if len(raw) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"{path} is truncated: its header claims {n} bytes")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')}, not read here")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if base + end > len(raw) or end - start != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name} runs past the file or has the wrong size")
        out[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=base + start).reshape(shape)
    return out


def _read_arrays(path: Path) -> Dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return _read_safetensors(path)


def load_results(path: Union[str, os.PathLike]) -> Results:
    """Read a results directory written by ``fisher-stein compute`` (or :meth:`Model.fisher`):
    ``metadata.json`` and every sequence's ``fisher*.safetensors`` / ``fisher*.npz``, rows in
    sequence order; ``mean.safetensors`` when the run kept a mean."""
    root = Path(path)
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give a results directory of fisher-stein compute")
        raise FileNotFoundError(
            f"{meta_path} is missing: {root} is not a finished fisher-stein results directory "
            "(a run still going, or killed: finish it with `compute --resume`)"
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path} is not JSON ({e}): the directory is damaged, rerun with --force") from None
    per_file: List[Dict[str, np.ndarray]] = []
    mean_only = bool(metadata.get("readouts", {}).get("mean_only"))
    if not mean_only:
        for seq in metadata.get("sequences", []):
            f = root / seq["file"]
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing (listed in {meta_path}): rerun the computation")
            per_file.append(_read_arrays(f))
    arrays: Dict[str, np.ndarray] = {}
    token_ids: List[np.ndarray] = []
    for a in per_file:
        for name, value in a.items():
            if name == "token_ids":
                continue
            arrays.setdefault(name, []).append(value)  # type: ignore[arg-type]
        token_ids.extend(np.asarray(row, dtype=np.int64) for row in a["token_ids"])
    arrays = {k: np.concatenate(v, axis=0) for k, v in arrays.items()}  # type: ignore[arg-type]
    if mean_only:
        token_ids = [np.asarray(t, dtype=np.int64) for t in metadata.get("token_ids", [])]
    empty_i = np.zeros(0, dtype=np.int64)
    summary = metadata.get("summary") or []
    directions = [row.get("directions") or [] for row in summary] if not mean_only else []
    sae = [row.get("sae") for row in summary] if not mean_only else []
    mean_path = root / "mean.safetensors"
    return Results(
        fisher=arrays.get("fisher"),
        layers=arrays.get("layer", empty_i),
        positions=arrays.get("positions", empty_i),
        sequences=arrays.get("sequence", empty_i),
        token_ids=token_ids,
        entropy=arrays.get("probs_entropy", np.zeros(0)),
        eigenvalues=arrays.get("eigenvalues"),
        eigenvectors=arrays.get("eigenvectors"),
        trace=arrays.get("trace"),
        residuals=arrays.get("residuals"),
        directions=directions,
        sae=sae,
        hooks=list(metadata.get("hooks", [])),
        mean=_read_safetensors(mean_path) if mean_path.is_file() else None,
        arrays=arrays,
        metadata=metadata,
    )


class Model:
    """A model loaded once (see :func:`load`); :meth:`fisher` runs on it as often as needed."""

    def __init__(self, native: "_native.Model", spec: str, backend: str, device: str):
        self._native = native
        self._spec = spec
        self._backend = backend
        self._device = device
        self._info: Dict[str, Any] = json.loads(native.info_json())

    @property
    def info(self) -> Dict[str, Any]:
        """What was loaded: ``model_type``, ``n_layers`` (split layers ``0..=n_layers``),
        ``hooks`` (the TransformerLens name of each split layer), ``d_model``, ``vocab_size``,
        ``max_seq_len``, ``parameters``, ``backend``, ``device``, the files and where they came
        from (``origin``), ``load_seconds``."""
        return dict(self._info)

    def __repr__(self) -> str:
        i = self._info
        return (
            f"fisher_stein.Model({self._spec!r}, {i['model_type']}, d = {i['d_model']}, "
            f"{i['n_layers']} blocks, {self._backend} on {self._device})"
        )

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` exactly as ``fisher(text=...)`` makes them (the tokenizer's own
        special tokens: BOS for Gemma and Llama 3, none for GPT-2)."""
        if not isinstance(text, str):
            raise ValueError("tokenize takes a string")
        return list(self._native.tokenize(text))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self._native.decode([int(i) for i in ids])

    def fisher(
        self,
        text: Union[str, Sequence[str], None] = None,
        tokens: Optional[Sequence[int]] = None,
        layers: Union[LayerArg, Sequence[LayerArg], None] = None,
        positions: PositionArg = "last",
        estimator: str = "exact",
        samples: Optional[int] = None,
        seed: int = 0,
        k: int = 16,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        tolerance: float = 1e-5,
        trace: str = "estimate",
        eig_top: Optional[int] = None,
        directions: int = 0,
        direction_tokens: int = 5,
        distribution: str = "next-token",
        mean: bool = False,
        sae: Union[str, os.PathLike, None] = None,
        max_seq_len: Optional[int] = None,
        output: Union[str, os.PathLike, None] = None,
        fmt: str = "safetensors",
    ) -> Results:
        """Fisher matrices ``F = J^T (diag p - p p^T) J`` of the next-token distribution with
        respect to the residual stream at each of ``layers``, at each of ``positions``.

        Input: ``text`` (a string, or a list of strings analysed as separate sequences) or
        ``tokens`` (token ids). ``layers``: an index (0 = embeddings, ``n_layers`` = last
        block's output), a TransformerLens hook name (``"blocks.6.hook_resid_pre"`` = 6,
        ``"blocks.5.hook_resid_post"`` = 6), a list of these, or ``"all"``. ``positions``:
        ``"last"``, ``"all"``, an int, a list of ints, or ``"0,3,10..12"`` (negative = from the
        end).

        ``estimator``:

        * ``"exact"`` — ``A^T G A`` with ``G = sum_y p_y (w_y - m)(w_y - m)^T``, the whole
          vocabulary;
        * ``"sampled"`` — ``(1/S) sum_s g_s g_s^T``, ``g_s = grad_h log p_{y_s}``, ``y_s ~ p``,
          ``samples`` draws (default 10), ``seed``; unbiased at ``temperature=1, top_p=1``;
        * ``"closed-form"`` — ``J^T diag(p) J - (J^T p)(J^T p)^T`` (an independent check);
        * ``"predictive"`` — mean exact F at ``t+1`` over ``samples`` next tokens drawn at ``t``;
        * ``"top-k"`` — the top ``k`` eigenpairs of F without forming it (``F v = A^T G (A v)``
          by JVPs and VJPs, block Krylov, residual tolerance ``tolerance``); ``r.fisher`` is
          ``None``, ``r.trace`` an estimate (``trace="exact"`` for the exact one).

        ``distribution``: ``"next-token"`` (default), or ``"attention:L.J"`` — the Fisher of
        the attention weights ``a`` of query head ``J`` of block ``L`` (``L`` at or above every
        analysed layer) over the keys the query sees, ``J^T (diag a - a a^T) J`` with ``J`` the
        score Jacobian (``estimator`` ``"exact"`` or ``"sampled"``; with ``directions`` the
        read-outs name the keys a direction moves attention toward).

        ``eig_top``: also store the top eigenpairs. ``directions``: decode the top directions
        (``r.directions``). ``mean``: also accumulate the mean F per layer (``r.mean``).
        ``sae``: a residual-stream SAE of the analysed layer (SAELens directory or Gemma Scope
        ``params.npz``): per row its active features ``a_i`` with the Fisher sensitivity
        ``w_i^T F w_i`` of their decoder directions, the second-order ablation cost
        ``1/2 a_i^2 w_i^T F w_i`` next to the measured ``KL(p || p(h - a_i w_i))``, and the top
        eigenvectors in feature space (``r.sae``).
        ``output``: keep the results directory there (as ``fisher-stein compute --output``;
        it must not exist or be empty) instead of a temporary one. ``fmt``: ``"safetensors"``
        or ``"npz"`` for that directory.
        """
        if (text is None) == (tokens is None):
            raise ValueError("give exactly one of text='...' (or a list of texts) and tokens=[...]")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: use one of {', '.join(_ESTIMATORS)}")
        # `--flag=value` throughout: a value may start with `-` (a negative position, a text).
        opts: Dict[str, Any] = {
            "model": self._spec,
            "backend": self._backend,
            "device": self._device,
            "layers": _layers_arg(layers),
            "positions": _positions_arg(positions),
            "estimator": estimator,
            "seed": int(seed),
            "temperature": repr(float(temperature)),
            "top-p": repr(float(top_p)),
            "k": int(k),
            "tolerance": repr(float(tolerance)),
            "trace": trace,
            "directions": int(directions),
            "direction-tokens": int(direction_tokens),
            "distribution": str(distribution),
            "format": fmt,
            "samples": None if samples is None else int(samples),
            "eig-top": None if eig_top is None else int(eig_top),
            "max-seq-len": None if max_seq_len is None else int(max_seq_len),
            "sae": None if sae is None else os.fspath(sae),
        }
        argv = [f"--{name}={value}" for name, value in opts.items() if value is not None]
        if mean:
            argv.append("--mean")
        keep = output is not None
        scratch = Path(tempfile.mkdtemp(prefix="fisher-stein-"))
        out_dir = Path(output) if keep else scratch / "results"
        try:
            if tokens is not None:
                ids = [int(t) for t in tokens]
                if not ids:
                    raise ValueError("tokens is empty: give at least one token id")
                if any(t < 0 for t in ids):
                    raise ValueError("token ids are non-negative integers")
                argv.append("--tokens=" + ",".join(map(str, ids)))
            elif isinstance(text, str):
                argv.append("--text=" + text)
            else:
                texts = list(text)  # type: ignore[arg-type]
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise ValueError("text must be a string or a non-empty list of strings")
                inputs = scratch / "texts.jsonl"
                inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
                argv.append(f"--input={inputs}")
            argv.append(f"--output={out_dir}")
            self._native.compute(argv)
            return load_results(out_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
