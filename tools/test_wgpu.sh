#!/usr/bin/env bash
# The device code path without a GPU: burn's wgpu backend on Mesa's software Vulkan driver
# (lavapipe, Debian `mesa-vulkan-drivers`). Runs tests/tests/backends.rs `device_agrees_with_cpu`
# with FS_TEST_DEVICE=wgpu: every fixture (GPT-2 and every decoder family) loaded on burn's wgpu
# device and on its CPU backend, logits at every layer and the exact F at every layer (last
# position) compared — uploads, kernels and downloads are the device path's, and on wgpu the
# exact F is formed on the device (`device_exact_fisher`: Jacobians, Gram and sandwich there).
# Measured here (2026-11-30, Intel AVX-512 VM): 12 fixtures, 42 comparisons, max |Δlogit|
# 1.4e-5, max exact-F relative difference 8.0e-6 (bound 1e-4), 5.8 s once built (the host-side
# F took 23 s); cold build 23 min 46 s.
#
# Not in `.ci/run`: building burn's wgpu stack for the suite took 24–31 min on this 2-core machine.
# Run it before every stop. Extra arguments go to the test binary; burn's whole half of the suite
# on wgpu (`-- --include-ignored burn::`) can be run the same way but is far slower on the CPU driver (one
# fixture test ran > 9 min without finishing: every finite-difference step is a kernel launch).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: Mesa's lavapipe Vulkan driver is missing: install it with \`sudo apt-get install mesa-vulkan-drivers\`" >&2
        exit 1
    fi
    apt-get install -y -q mesa-vulkan-drivers >&2
fi
# wgpu warns on every run without a runtime directory.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    export XDG_RUNTIME_DIR
fi
export FS_TEST_DEVICE=wgpu
cargo test --locked -p fs-suite --no-default-features --features wgpu --test backends -- \
    --include-ignored device_agrees_with_cpu --nocapture "$@"
