"""Shared fixtures of the Python package's tests: repository paths, the command-line binary to
compare against, and the real SmolLM2 GGUF (fetched and sha256-checked by the repo's script)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `fisher-stein` binary of the same checkout (`FISHER_STEIN_BIN`, else target/debug)."""
    path = Path(os.environ.get("FISHER_STEIN_BIN", REPO / "target" / "debug" / "fisher-stein"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it (`cargo build -p fisher-stein`) or set FISHER_STEIN_BIN")
    return path


@pytest.fixture(scope="session")
def smollm2() -> str:
    out = subprocess.run(
        [str(REPO / "tools" / "fetch_smollm2.sh")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"tools/fetch_smollm2.sh failed: {out.stderr.strip()}")
    return out.stdout.strip()
