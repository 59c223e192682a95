#!/usr/bin/env bash
# The steering study of the README (issue #22): the 20 prompt/target pairs of
# examples/steering/study.json steered to p(target) = 0.3 on SmolLM2-135M (layer 15 of 30) and
# Gemma-3-270M (layer 9 of 18) by the Euclidean gradient, the damped Fisher direction
# (ρ = 0.01, exact F per step) and the contrastive vectors; writes OUT/smollm2 and OUT/gemma3
# (steer.json, report.html, plots/steering.png) and prints both summaries.
#
#   tools/steering_study.sh [OUT]          (default /tmp/fisher-stein-steering)
#
# Fetches the two GGUFs (sha256-checked, cached) with the repository's fetch scripts and builds
# the release binary. Takes about 30 min (SmolLM2) + 35 min (Gemma-3) on a 2-core VM: each
# Fisher step forms the exact F (Gemma-3's V·d² = 1.1e11 flops per step). Gemma-3 runs with
# --max-step-nats 1.0 (SmolLM2 with the default 0.5) to halve its steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/fisher-stein-steering}"
cargo build --release -p fisher-stein
BIN=target/release/fisher-stein
SMOLLM2="$(tools/fetch_smollm2.sh)"
GEMMA3="$(tools/fetch_gemma3.sh)"
$BIN steer --model "$SMOLLM2" --layer 15 --pairs examples/steering/study.json --to 0.3 \
    --output "$OUT/smollm2" --force
$BIN steer --model "$GEMMA3" --layer 9 --pairs examples/steering/study.json --to 0.3 \
    --max-step-nats 1.0 --output "$OUT/gemma3" --force
for m in smollm2 gemma3; do
    $BIN report "$OUT/$m"
done
