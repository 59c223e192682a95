#!/usr/bin/env bash
# Compile the CUDA builds here, without a GPU or a system CUDA toolkit: `cargo clippy -D warnings`
# of the binary with candle and dfdx and `--features cuda` (both engines' CUDA backends), with
# NVIDIA's CUDA 13.0 toolkit from PyPI wheels (nvcc, the runtime headers, CCCL, NVVM; pinned in
# tools/cuda_env.sh) in a venv outside the repository. Build scripts run under `cargo check`: candle-kernels
# compiles its kernels to PTX for sm_90 (the H200 the device tool lends) with that nvcc, and
# cudarc asks nvcc for the CUDA version. `cargo check` links nothing; tools/gpu-check.sh links
# the binaries (cudarc links libcuda, cuBLAS, cuRAND and NVRTC by name) and runs them.
#
#   tools/check_gpu_builds.sh            # the check (its own target dir: target/gpu-check)
#   FS_CUDA_VENV=/path tools/check_gpu_builds.sh
#
# burn's CUDA backend cannot be built here: cubecl-cuda 0.11 pulls cubecl-llvm (`nvptx`), whose
# build script downloads a prebuilt LLVM 23 bundle from tracel's servers (tracel-llvm-bundler),
# and only the package registries are reachable from this machine (the build stops with "failed
# to lookup address information"); llvm-sys 231 then needs that LLVM 23 (Debian 12 has ≤ 16).
# burn's device path is exercised through wgpu instead (tools/test_wgpu.sh). Linking and running
# the CUDA binaries: tools/gpu-check.sh.
#
# Not in `.ci/run` (a cold check with CUDA takes longer than CI's budget leaves); run it before a
# stop that touches device code. What each feature needs is in README.md ("Backends").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/cuda_env.sh
source tools/cuda_env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu-check}
nvcc --version | tail -n 2
# clippy, not only check: the CUDA-only code (device opening, the device KV cache) is linted here
# and nowhere else.
cargo clippy --locked -p fisher-stein -p backend-candle -p backend-dfdx \
    --features fisher-stein/candle,fisher-stein/dfdx,fisher-stein/cuda -- -D warnings
echo "check_gpu_builds: candle and dfdx compile (and pass clippy) with --features cuda (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$CUDA_COMPUTE_CAP)"
