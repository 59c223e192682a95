#!/usr/bin/env bash
# Build the Python package (crates/python) into a venv and run its tests: the second half of the
# README's test command (after `cargo test`, whose build it reuses: same profile and features).
#
# The venv lives in target/py-venv (made once; maturin, pytest and numpy pinned in
# crates/python/requirements-test.txt, from PyPI). `maturin develop` compiles the extension
# (dev profile, every engine) and installs the package editable; the tests compare it with the
# command-line binary of the same build (target/debug/fisher-stein).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="$root/target/py-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r crates/python/requirements-test.txt
cargo build --locked --features fisher-stein/all-backends -p fisher-stein --bin fisher-stein
(
    cd crates/python
    VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --locked --quiet --features all-backends
)
FISHER_STEIN_BIN="$root/target/debug/fisher-stein" "$venv/bin/python" -m pytest crates/python/tests -q "$@"
