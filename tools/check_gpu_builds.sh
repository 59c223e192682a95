#!/usr/bin/env bash
# Compile the CUDA builds here, without a GPU or a system CUDA toolkit: `cargo check` of the
# binary with candle and dfdx and `--features cuda` (both engines' CUDA backends), with
# NVIDIA's CUDA 13.0 toolkit from PyPI wheels (nvcc, the runtime headers, CCCL, NVVM; pinned
# below) in a venv outside the repository. Build scripts run under `cargo check`: candle-kernels
# compiles its kernels to PTX for sm_90 (the H200 the device tool lends) with that nvcc, and
# cudarc asks nvcc for the CUDA version. Nothing is linked against a driver: cudarc loads
# libcuda, cuBLAS, cuRAND and NVRTC at run time.
#
#   tools/check_gpu_builds.sh            # the check (its own target dir: target/gpu-check)
#   FS_CUDA_VENV=/path tools/check_gpu_builds.sh
#
# burn's CUDA backend cannot be built here: cubecl-cuda 0.11 pulls cubecl-llvm (`nvptx`), whose
# build script downloads a prebuilt LLVM 23 bundle from tracel's servers (tracel-llvm-bundler),
# and only the package registries are reachable from this machine (the build stops with "failed
# to lookup address information"); llvm-sys 231 then needs that LLVM 23 (Debian 12 has ≤ 16).
# burn's device path is exercised through wgpu instead (tools/test_wgpu.sh).
#
# Not in `.ci/run` (a cold check with CUDA takes longer than CI's budget leaves); run it before a
# stop that touches device code. What each feature needs is in README.md ("Backends").
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FS_CUDA_VENV:-$HOME/.venvs/fisher-stein-cuda}
site() { "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null || [ ! -x "$(site)/nvidia/cu13/bin/nvcc" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
        "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
fi
cuda="$(site)/nvidia/cu13"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# dfdx's build script asks `nvidia-smi --query-gpu=compute_cap` for the GPU to compile for; with
# no GPU here, a stand-in answers with the target's (CUDA_COMPUTE_CAP, 90 = the H200).
shim="$venv/gpu-shim"
mkdir -p "$shim"
printf '#!/bin/sh\n# Stand-in for builds without a GPU (tools/check_gpu_builds.sh).\nprintf "compute_cap\\n%%s.%%s\\n" "${CUDA_COMPUTE_CAP%%?}" "${CUDA_COMPUTE_CAP#?}"\n' >"$shim/nvidia-smi"
chmod +x "$shim/nvidia-smi"
export PATH="$cuda/bin:$shim:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu-check}
nvcc --version | tail -n 2
cargo check --locked -p fisher-stein --features candle,dfdx,cuda
echo "check_gpu_builds: candle and dfdx compile with --features cuda (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$CUDA_COMPUTE_CAP)"
