"""The Python package against the command line: the same results bit for bit on the repository's
oracle fixtures, numpy dtypes and shapes, TransformerLens names, errors as Python exceptions
with the command line's one-line messages, the GIL released and Ctrl-C honoured."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fisher_stein
from conftest import FIXTURES, REPO

GPT2 = str(FIXTURES / "gpt2-tiny-b")
LLAMA = str(FIXTURES / "llama-tiny-untied")
IDS = [15, 42, 7, 199, 3, 88, 120, 5]


def run_cli(cli, args, out_dir):
    """`fisher-stein compute ARGS --output OUT_DIR`; the results as `load_results` reads them."""
    done = subprocess.run(
        [str(cli), "-q", "compute", *args, "--output", str(out_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return fisher_stein.load_results(out_dir)


def cli_error(cli, args, tmp_path):
    """The one-line message the command line prints for ARGS (without `error: `)."""
    done = subprocess.run(
        [str(cli), "compute", *args, "--output", str(tmp_path / "never")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0][len("error: ") :]


def assert_same_results(a, b):
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        x, y = a.arrays[name], b.arrays[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"
    assert [t.tolist() for t in a.token_ids] == [t.tolist() for t in b.token_ids]
    skip = {"timings_s", "input"}
    ma = {k: v for k, v in a.metadata.items() if k not in skip}
    mb = {k: v for k, v in b.metadata.items() if k not in skip}
    assert json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)


@pytest.fixture(scope="module")
def gpt2():
    return fisher_stein.load(GPT2)


@pytest.fixture(scope="module")
def llama():
    return fisher_stein.load(LLAMA)


CASES = [
    # (model, Python keyword arguments, the same run as command-line flags)
    (
        GPT2,
        dict(tokens=IDS, layers="all", positions="all"),
        ["--tokens", ",".join(map(str, IDS)), "--layers", "all", "--positions", "all"],
    ),
    (
        GPT2,
        dict(tokens=IDS, layers=[1, 3], positions=[0, -1], estimator="sampled", samples=7, seed=11),
        ["--tokens", ",".join(map(str, IDS)), "--layers", "1,3", "--positions", "0,-1",
         "--estimator", "sampled", "--samples", "7", "--seed", "11"],
    ),
    (
        LLAMA,
        dict(tokens=IDS, layers="blocks.1.hook_resid_post", positions="all", directions=2, eig_top=4),
        ["--tokens", ",".join(map(str, IDS)), "--layer", "2", "--positions", "all",
         "--directions", "2", "--eig-top", "4"],
    ),
    (
        LLAMA,
        dict(tokens=IDS, layers=[0, 3], estimator="top-k", k=3, seed=5),
        ["--tokens", ",".join(map(str, IDS)), "--layers", "0,3", "--estimator", "top-k",
         "--k", "3", "--seed", "5"],
    ),
    (
        LLAMA,
        dict(tokens=IDS, layers=1, positions="all", sae=str(FIXTURES / "sae" / "saelens-relu")),
        ["--tokens", ",".join(map(str, IDS)), "--layer", "1", "--positions", "all",
         "--sae", str(FIXTURES / "sae" / "saelens-relu")],
    ),
    (
        LLAMA,
        dict(tokens=IDS, layers=1, positions="all", distribution="attention:1.2", directions=2),
        ["--tokens", ",".join(map(str, IDS)), "--layer", "1", "--positions", "all",
         "--distribution", "attention:1.2", "--directions", "2"],
    ),
    (
        LLAMA,
        dict(tokens=IDS, layers=1, positions="2..5", estimator="closed-form", mean=True, fmt="npz"),
        ["--tokens", ",".join(map(str, IDS)), "--layer", "1", "--positions", "2..5",
         "--estimator", "closed-form", "--mean", "--format", "npz"],
    ),
]


@pytest.mark.parametrize("model,kwargs,flags", CASES)
def test_results_equal_the_command_line_bit_for_bit(model, kwargs, flags, cli, tmp_path, gpt2, llama):
    m = gpt2 if model == GPT2 else llama
    from_python = m.fisher(**kwargs)
    from_cli = run_cli(cli, ["--model", model, *flags], tmp_path / "cli")
    # The hook name the Python run was given is recorded as given; the rest is identical.
    if isinstance(kwargs.get("layers"), str) and kwargs["layers"].startswith("blocks."):
        assert from_python.hooks == [kwargs["layers"]]
        from_python.metadata["hooks"] = from_cli.metadata["hooks"]
        from_python.hooks = from_cli.hooks
    assert_same_results(from_python, from_cli)
    if kwargs.get("mean"):
        assert from_python.mean is not None
        for name, x in from_python.mean.items():
            assert x.tobytes() == from_cli.mean[name].tobytes(), name


def test_output_directory_is_the_command_lines(gpt2, cli, tmp_path):
    kept = tmp_path / "kept"
    r = gpt2.fisher(tokens=IDS, layers=2, positions="all", output=kept)
    assert (kept / "fisher.safetensors").is_file() and (kept / "metadata.json").is_file()
    again = fisher_stein.load_results(kept)
    assert again.fisher.tobytes() == r.fisher.tobytes()
    # The command line reads what Python wrote.
    shown = subprocess.run([str(cli), "inspect", str(kept)], capture_output=True, text=True, check=True)
    assert "top eigenvalues" in shown.stdout


def test_dtypes_and_shapes(llama):
    d = llama.info["d_model"]
    r = llama.fisher(tokens=IDS, layers=[0, 2], positions="all", directions=1)
    n = 2 * len(IDS)
    assert len(r) == n
    assert r.fisher.dtype == np.float32 and r.fisher.shape == (n, d, d)
    assert r.layers.dtype == np.int64 and r.layers.tolist() == [0] * 8 + [2] * 8
    assert r.positions.tolist() == list(range(8)) * 2
    assert r.sequences.tolist() == [0] * n
    assert r.entropy.dtype == np.float64 and r.entropy.shape == (n,)
    assert np.all(r.entropy > 0) and np.all(r.entropy <= np.log(llama.info["vocab_size"]) + 1e-9)
    assert r.eigenvalues.dtype == np.float32 and r.eigenvalues.shape == (n, 1)
    assert r.eigenvectors.shape == (n, d, 1)
    assert [t.tolist() for t in r.token_ids] == [IDS]
    # Symmetric; its top eigenpair is the stored one.
    f = r.fisher[3].astype(np.float64)
    assert np.abs(f - f.T).max() <= 1e-6 * np.abs(f).max()
    w, v = np.linalg.eigh(f)
    assert abs(w[-1] - r.eigenvalues[3, 0]) <= 1e-5 * w[-1]
    assert abs(abs(v[:, -1] @ r.eigenvectors[3, :, 0]) - 1) <= 1e-4
    assert len(r.directions) == n and r.directions[0][0]["k"] == 1
    # Values that start with "-" reach the command line as values, not flags.
    assert llama.fisher(tokens=IDS, layers=1, positions=-1).positions.tolist() == [7]
    assert llama.fisher(tokens=IDS, layers=1, positions=[-2, -1]).positions.tolist() == [6, 7]
    top = llama.fisher(tokens=IDS, layers=1, estimator="top-k", k=4)
    assert top.fisher is None and top.eigenvalues.shape == (1, 4) and top.residuals.shape == (1, 4)
    assert top.trace.shape == (1,)


def test_info_and_hooks(llama, gpt2):
    info = llama.info
    assert info["model_type"] == "llama" and info["n_layers"] == 3 and info["d_model"] == 48
    assert info["hooks"] == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_pre",
        "blocks.2.hook_resid_post",
    ]
    assert info["backend"] == "candle" and info["device"] == "cpu"
    assert gpt2.info["model_type"] == "gpt2"
    by_hook = llama.fisher(tokens=IDS, layers=["hook_embed", "blocks.0.hook_resid_post"])
    by_index = llama.fisher(tokens=IDS, layers=[0, 1])
    assert by_hook.fisher.tobytes() == by_index.fisher.tobytes()
    assert by_hook.hooks == ["hook_embed", "blocks.0.hook_resid_post"]


@pytest.mark.parametrize(
    "kwargs,flags,fragment,error",
    [
        (dict(tokens=IDS, layers=9), ["--tokens", "1,2", "--layers", "9"], "0..=3", ValueError),
        (dict(tokens=[1, 300], layers=1), ["--tokens", "1,300", "--layers", "1"], "token id 300", ValueError),
        (
            dict(tokens=IDS, layers="blocks.1.hook_attn_out"),
            ["--tokens", "1,2", "--layers", "blocks.1.hook_attn_out"],
            "hook_attn_out is not on the residual stream",
            ValueError,
        ),
        (dict(text="hello", layers=1), ["--text", "hello", "--layers", "1"], "tokenizer", FileNotFoundError),
        (
            dict(tokens=IDS, layers=1, estimator="sampled", samples=0),
            ["--tokens", "1,2", "--layers", "1", "--estimator", "sampled", "--samples", "0"],
            "--samples 0",
            ValueError,
        ),
        (
            dict(tokens=IDS, layers=1, estimator="top-k", k=4, directions=5),
            ["--tokens", "1,2", "--layers", "1", "--estimator", "top-k", "--k", "4", "--directions", "5"],
            "--directions 5 with --k 4",
            ValueError,
        ),
    ],
)
def test_bad_input_raises_with_the_command_lines_message(
    llama, cli, tmp_path, kwargs, flags, fragment, error
):
    """Bad input is a ValueError (a missing file, here the tokenizer, a FileNotFoundError)
    whose text is the line the command line prints for the same request (Python passes layers
    as `--layers`)."""
    expected = cli_error(cli, ["--model", LLAMA, *flags], tmp_path)
    assert fragment in expected
    with pytest.raises(error) as e:
        llama.fisher(**kwargs)
    assert type(e.value) is error and str(e.value) == expected


def test_python_side_argument_errors(llama):
    with pytest.raises(ValueError, match="exactly one of"):
        llama.fisher(layers=1)
    with pytest.raises(ValueError, match="estimator 'exakt'"):
        llama.fisher(tokens=IDS, layers=1, estimator="exakt")
    with pytest.raises(ValueError, match="give layers"):
        llama.fisher(tokens=IDS)
    with pytest.raises(ValueError, match="positions"):
        llama.fisher(tokens=IDS, layers=1, positions=[0.5])
    with pytest.raises(ValueError, match='backend "torch" is not an engine'):
        fisher_stein.load(LLAMA, backend="torch")


def test_missing_files_raise_file_not_found(cli, tmp_path):
    missing = str(tmp_path / "no-such-model")
    expected = cli_error(cli, ["--model", missing, "--layer", "0", "--tokens", "1"], tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        fisher_stein.load(missing)
    assert str(e.value) == expected
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fisher_stein.load_results(tmp_path / "no-results")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
        fisher_stein.load_results(tmp_path / "half")


def test_engines_agree(llama):
    if "burn" not in fisher_stein.backends():
        pytest.fail("this build has no burn engine: build with --features all-backends")
    burn = fisher_stein.load(LLAMA, backend="burn")
    a = llama.fisher(tokens=IDS, layers=2, positions="all").fisher.astype(np.float64)
    b = burn.fisher(tokens=IDS, layers=2, positions="all").fisher.astype(np.float64)
    # The cross-backend bound of the Rust suite (relative Frobenius, exact F).
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a)
    assert burn.info["backend"] == "burn"


def test_real_model_text_and_tokenizer(smollm2):
    m = fisher_stein.load(smollm2)
    ids = m.tokenize("The capital of France is")
    assert m.decode(ids) == "The capital of France is"
    r = m.fisher(text=["The capital of France is", "One, two, three,"], layers=15, directions=1)
    assert [t.tolist() for t in r.token_ids][0] == ids
    assert r.sequences.tolist() == [0, 1]
    up = [t["token"] for t in r.directions[0][0]["up"]]
    assert '" Paris"' in up, up  # token strings as the command line quotes them  # the README's main job: the top direction moves " Paris"


def test_the_gil_is_released_while_computing(smollm2):
    m = fisher_stein.load(smollm2)
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.01)

    t = threading.Thread(target=count)
    t.start()
    start = time.perf_counter()
    m.fisher(text="The capital of France is", layers=25, positions="all")
    end = time.perf_counter()
    stop.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    # With the GIL held for the whole call the other thread could not tick at all.
    assert end - start > 0.3 and len(during) >= 0.3 * (end - start) / 0.01, (end - start, len(during))


def test_ctrl_c_interrupts_a_computation_and_the_model_stays_usable(smollm2):
    m = fisher_stein.load(smollm2)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    # One position first, to know what the whole (uninterrupted) call would cost.
    t0 = time.perf_counter()
    m.fisher(text=text, layers=25, positions="last")
    one = time.perf_counter() - t0
    n = len(m.tokenize(text))
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        m.fisher(text=text, layers=25, positions="all")
    stopped = time.perf_counter() - t0
    timer.cancel()
    # All n positions would take about n · one; the interrupt lands within a position or two.
    assert stopped < 0.5 + 5 * one + 2.0 < n * one, (stopped, one, n)
    r = m.fisher(text="The capital of France is", layers=15)
    assert r.fisher.shape == (1, 576, 576)


def test_the_notebook_example_runs(smollm2):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python" / "quickstart.py"), smollm2],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "+v pushes up: \" Paris\" (+0.077)" in done.stdout, done.stdout
    assert "max residual" in done.stdout
