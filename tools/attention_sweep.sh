#!/usr/bin/env bash
# The attention-Fisher sweep of docs/ATTENTION.md: for one prompt, split layer K and every query
# head of blocks FIRST..LAST, `compute --distribution attention:L.J --directions 1` at the last
# position; prints one tab-separated row per head: block, head, the head's weight on KEY
# (a position), entropy, trace and λ1 of the attention Fisher, and the key the top eigenvector
# moves attention toward most (with ∂a/∂ε).
#   tools/attention_sweep.sh MODEL "TEXT" K FIRST LAST KEY [HEADS]   (HEADS: default 9)
# Needs target/debug/fisher-stein (cargo build --features fisher-stein/all-backends) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 text=$2 k=$3 first=$4 last=$5 key=$6 heads=${7:-9}
bin=target/debug/fisher-stein
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf 'block\thead\ta(key %s)\tentropy\ttrace\tlambda1\tv1 moves attention to\n' "$key"
for l in $(seq "$first" "$last"); do
  for j in $(seq 0 $((heads - 1))); do
    "$bin" -q compute --model "$model" --text "$text" --layer "$k" \
      --distribution "attention:$l.$j" --directions 1 --direction-tokens 1 \
      --output "$out/r" --force >/dev/null
    python3 - "$out/r" "$key" "$l" "$j" <<'PY'
import json, struct, sys
d, key, l, j = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
raw = open(f"{d}/fisher.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
t = hdr["attention_weights"]
a, b = t["data_offsets"]
w = struct.unpack(f"<{(b - a) // 8}d", raw[8 + n + a:8 + n + b])
s = json.load(open(f"{d}/metadata.json"))["summary"][0]
up = s["directions"][0]["up"][0]
print(f"{l}\t{j}\t{w[key]:.3f}\t{s['entropy']:.3f}\t{s['trace']:.3e}\t{s['top_eigenvalues'][0]:.3e}\t{up['token']} ({up['dp']:+.3f})")
PY
  done
done
