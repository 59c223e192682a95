# Sourced (not run) by tools/check_gpu_builds.sh and tools/gpu-check.sh: a CUDA 13.0 build
# environment without a GPU or a system CUDA toolkit, from NVIDIA's PyPI wheels in a venv outside
# the repository ($FS_CUDA_VENV, default ~/.venvs/fisher-stein-cuda).
#
# * nvcc, the runtime headers, CCCL, crt and NVVM (pinned below): candle-kernels and dfdx compile
#   their kernels to PTX for sm_$CUDA_COMPUTE_CAP (default 90, the H200 the device tool lends);
#   cudarc asks nvcc for the CUDA version.
# * With `FS_CUDA_LINK=1`: cuBLAS, cuRAND and NVRTC too (cudarc links them by name:
#   candle's and dfdx's cudarc use `dynamic-linking`), unversioned symlinks to them, and a stub
#   libcuda.so (soname libcuda.so.1) whose every driver entry point returns
#   CUDA_ERROR_NO_DEVICE (100). The stub lets the binaries link here, and start here without a
#   GPU (every CUDA device request then fails with "no CUDA-capable device"); on a GPU machine
#   the driver's libcuda.so.1 is found first (tools/gpu-check.sh puts only the driver's on the
#   library path there).
# * `nvidia-smi`: dfdx's build script asks it for the GPU's compute capability; with no GPU here a
#   stand-in answers with $CUDA_COMPUTE_CAP.
#
# Exports PATH, CUDA_ROOT, CUDA_PATH, CUDA_HOME, CUDA_COMPUTE_CAP and FS_CUDA_LIB (the folder of
# the runtime libraries and the stub).
fs_cuda_venv=${FS_CUDA_VENV:-$HOME/.venvs/fisher-stein-cuda}
fs_cuda_site() { "$fs_cuda_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -x "$fs_cuda_venv/bin/python" ]; then
    python3 -m venv "$fs_cuda_venv"
fi
if [ ! -x "$(fs_cuda_site)/nvidia/cu13/bin/nvcc" ]; then
    "$fs_cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
        "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
fi
fs_cuda="$(fs_cuda_site)/nvidia/cu13"
FS_CUDA_LIB="$fs_cuda/lib"
if [ "${FS_CUDA_LINK:-0}" = 1 ]; then
    if [ ! -e "$FS_CUDA_LIB/libcublas.so.13" ] || [ ! -e "$FS_CUDA_LIB/libcurand.so.10" ] \
        || [ ! -e "$FS_CUDA_LIB/libnvrtc.so.13" ]; then
        "$fs_cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
            "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
    fi
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
        ln -sf "$lib" "$FS_CUDA_LIB/${lib%.so.*}.so"
    done
    # Rebuilt when missing or made by an older version of this script (no error strings).
    if ! grep -qa 'no CUDA-capable device is detected' "$FS_CUDA_LIB/libcuda.so.1" 2>/dev/null; then
        # Every driver entry point either cudarc (candle's 0.19, dfdx's 0.9) may call.
        fs_reg="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -n 1)"
        fs_stub="$(mktemp -d)"
        cat "$fs_reg"/cudarc-0.19.*/src/driver/sys/mod.rs "$fs_reg"/cudarc-0.9.*/src/driver/sys.rs \
            | grep -oE '\bfn cu[A-Z][A-Za-z0-9_]*' | sed 's/^fn //' | sort -u \
            | grep -vxE 'cuGetErrorString|cuGetErrorName' \
            | awk 'BEGIN { print "/* Stub libcuda for linking without a GPU: every call returns CUDA_ERROR_NO_DEVICE, */"
                           print "/* and the error strings are answered as a driver answers them. */"
                           print "int cuGetErrorString(int e, const char **s) { *s = \"no CUDA-capable device is detected\"; return 0; }"
                           print "int cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }" }
                   { print "int " $1 "(void) { return 100; }" }' >"$fs_stub/cuda_stub.c"
        gcc -shared -fPIC -o "$FS_CUDA_LIB/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$fs_stub/cuda_stub.c"
        rm -rf "$fs_stub"
    fi
    ln -sf libcuda.so.1 "$FS_CUDA_LIB/libcuda.so"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fs_shim="$fs_cuda_venv/gpu-shim"
mkdir -p "$fs_shim"
printf '#!/bin/sh\n# Stand-in for builds without a GPU (tools/cuda_env.sh).\nprintf "compute_cap\\n%%s.%%s\\n" "${CUDA_COMPUTE_CAP%%?}" "${CUDA_COMPUTE_CAP#?}"\n' >"$fs_shim/nvidia-smi"
chmod +x "$fs_shim/nvidia-smi"
export PATH="$fs_cuda/bin:$fs_shim:$PATH" CUDA_ROOT="$fs_cuda" CUDA_PATH="$fs_cuda" CUDA_HOME="$fs_cuda"
export FS_CUDA_LIB
