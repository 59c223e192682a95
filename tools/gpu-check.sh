#!/usr/bin/env bash
# The one-shot GPU check: build here, run once on the lent GPU machine (the device tool), one table.
#
#   tools/gpu-check.sh build     # here: CUDA builds of the binary and of the suite → .gpu-bundle/
#   tools/gpu-check.sh run       # there: device tool run(command="tools/gpu-check.sh run",
#                                #        carry=[".gpu-bundle"], timeout_s=570)
#   tools/gpu-check.sh run --cpu # here: the same steps on the CPU (the bundle's plumbing)
#
# The lent machine (the device tool's README and KINDS.md) has one H200, NVIDIA's driver, nvcc
# 13.0 and PyTorch with CUDA 13 wheels, but no Rust toolchain and no registry, and takes 64 MiB of
# working tree plus carried files per call. So `build` compiles everything here (CUDA 13.0 from
# PyPI wheels, kernels for sm_90: tools/cuda_env.sh) and only two stripped, xz-compressed
# executables travel (.gpu-bundle/, ignored by git), with Debian's Vulkan loader for burn's wgpu
# backend (burn's CUDA backend cannot be built offline: tools/check_gpu_builds.sh):
#   * `fisher-stein` with `--features candle-cuda,dfdx-cuda,wgpu` (no Hub download);
#   * the cross-backend suite `tests/tests/backends.rs` with the same engines.
# The fixtures the suite reads travel with the working tree (FS_FIXTURES_DIR points at them).
#
# `run` needs nothing but the bundle: it finds the driver's libcuda and the CUDA 13 libraries
# (cuBLAS, cuRAND, NVRTC) on the machine, then runs, each step under its own time limit (≤ 8 min
# in all), and prints one table (also written to $OUT/gpu-check.md when $OUT is set):
#   * the suite with FS_TEST_DEVICE=cuda:0 (candle and dfdx: oracle fixtures, SplitModel contract)
#     and FS_TEST_DEVICE=wgpu (burn), and `device_agrees_with_cpu` on each device;
#   * `bench` rows: every position of a 256-token GPT-2-small sequence, exact (goal ≤ 10 s for
#     all 256), on each engine; Gemma-3-270M's shape, exact; llama-3.1-8b's shape, top-16.
# Without a GPU it stops at once with one line and exit status 3 (nothing hangs). `--cpu` runs
# every step on the CPU here instead (small bench shapes; the CUDA libraries from the build venv,
# a stub libcuda that answers "no device"), and checks that a CUDA request fails with one line.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bundle=$root/.gpu-bundle
features=candle-cuda,dfdx-cuda,wgpu

die() {
    echo "gpu-check: $*" >&2
    exit "${code:-1}"
}

build() {
    set -e
    export FS_CUDA_LINK=1
    # shellcheck source=tools/cuda_env.sh
    source tools/cuda_env.sh
    nvcc --version | tail -n 1
    cargo build --locked -p fisher-stein --no-default-features --features "$features"
    local suite
    suite=$(cargo test --locked --no-run -p fs-suite --no-default-features --features "$features" \
        --test backends --message-format=json \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    [ -x "$suite" ] || die "no suite executable from cargo"
    rm -rf "$bundle"
    mkdir -p "$bundle/bin"
    local target=${CARGO_TARGET_DIR:-target}
    strip -o "$bundle/bin/fisher-stein" "$target/debug/fisher-stein"
    strip -o "$bundle/bin/fs-suite-backends" "$suite"
    # The binaries must start here (against the stub libcuda) before they travel.
    LD_LIBRARY_PATH="$FS_CUDA_LIB" "$bundle/bin/fisher-stein" --version
    LD_LIBRARY_PATH="$FS_CUDA_LIB" "$bundle/bin/fs-suite-backends" --list >/dev/null
    (cd "$bundle/bin" && sha256sum fisher-stein fs-suite-backends >SHA256SUMS)
    # One 256 MiB window: the two executables share most of their bytes (the kernels, the engines).
    tar -C "$bundle" -cf - bin | xz -T1 --lzma2=preset=9,dict=256MiB >"$bundle/bin.tar.xz"
    rm -rf "$bundle/bin"
    # Debian's Vulkan loader (amd64), for burn's wgpu backend where the image lacks one.
    (cd "$bundle" && apt-get download -q libvulkan1:amd64 >/dev/null)
    {
        echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
        echo "built $(date -u +%FT%TZ) on $(uname -m), features $features, test profile"
        echo "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$CUDA_COMPUTE_CAP"
    } >"$bundle/MANIFEST"
    local tree bundle_bytes
    # What travels: tracked files and untracked ones git does not ignore, plus the bundle.
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f 1)
    bundle_bytes=$(du -cb "$bundle"/* | tail -n 1 | cut -f 1)
    echo "bundle: $((bundle_bytes / 1024 / 1024)) MiB (+ working tree $((tree / 1024 / 1024)) MiB; the device tool takes 64 MiB)"
    ls -l "$bundle"
    [ $((tree + bundle_bytes)) -lt $((64 * 1024 * 1024)) ] || die "working tree + bundle is over 64 MiB"
}

# ---------------------------------------------------------------------------------------------
# run

rows=()
failed=0

# step NAME SECONDS CMD...: run CMD under a time limit (× $limit_scale), log it, add a table row.
limit_scale=1
step() {
    local name=$1 limit=$(($2 * limit_scale))
    shift 2
    local log="$logs/$(echo "$name" | tr -c 'A-Za-z0-9\n' '-').log"
    local t0 t1 status rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT (${limit} s)"; failed=1 ;;
        *) status="FAILED (exit $rc)"; failed=1 ;;
    esac
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    local detail
    detail=$(summarise "$log")
    rows+=("| $name | $status | $secs s | $detail |")
    echo "[$name] $status in $secs s" >&2
    # Bench tables are copied whole below the summary.
    grep -E '^\| ' "$log" | grep -v -- '---|' | grep -v '^| shape ' >>"$benches" || true
}

# The one line that says what a step found: test counts, an agreement line, or the last error.
summarise() {
    local log=$1 line
    line=$(grep -E 'agrees with cpu' "$log" | tr '\n' ' ' | cut -c 1-300)
    if grep -qE '^test result:' "$log"; then
        line="$(grep -E '^test result:' "$log" | tail -n 1 | sed 's/; [0-9]* measured.*//') $line"
    fi
    if [ -z "$line" ]; then
        line=$(grep -vE '^\s*$' "$log" | tail -n 1 | cut -c 1-200)
    fi
    echo "${line//|/\\|}"
}

# The directories holding each of the libraries, where the image keeps them: the driver's
# folder, the CUDA toolkit, PyTorch's NVIDIA wheels.
find_libraries() {
    local dirs=() lib d found
    local candidates=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu
        /usr/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
        /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib)
    local py
    for py in python3 /opt/torch/.venv/bin/python3; do
        command -v "$py" >/dev/null || continue
        local site
        site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) || continue
        candidates+=("$site"/nvidia/cu13/lib "$site"/nvidia/*/lib)
    done
    local missing=()
    for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
        found=
        for d in "${candidates[@]}"; do
            if [ -e "$d/$lib" ]; then
                found=$d
                break
            fi
        done
        if [ -z "$found" ]; then
            # Wherever the dynamic linker's cache has it.
            found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')
            found=${found%/*}
        fi
        if [ -z "$found" ]; then
            missing+=("$lib")
        else
            case " ${dirs[*]-} " in *" $found "*) ;; *) dirs+=("$found") ;; esac
        fi
    done
    [ ${#missing[@]} -eq 0 ] || code=4 die "CUDA libraries not found on this machine: ${missing[*]} (looked in the driver's folder, /usr/local/cuda and PyTorch's nvidia wheels)"
    local IFS=:
    echo "${dirs[*]}"
}

run() {
    local cpu=0
    [ "${1:-}" = --cpu ] && cpu=1
    [ -f "$bundle/bin.tar.xz" ] || die "no bundle: run \`tools/gpu-check.sh build\` here first, then carry .gpu-bundle"
    local cuda=cuda:0 wgpu=wgpu
    if [ $cpu = 0 ]; then
        command -v nvidia-smi >/dev/null \
            || code=3 die "no NVIDIA GPU here (nvidia-smi is not on PATH): run this on the lent GPU machine, or \`tools/gpu-check.sh run --cpu\` to test the bundle on the CPU"
        timeout 30 nvidia-smi -L >/dev/null 2>&1 \
            || code=3 die "nvidia-smi finds no GPU: $(timeout 30 nvidia-smi -L 2>&1 | head -n 1)"
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/fs-gpu-check.XXXXXX")
    logs=$work/logs
    benches=$work/bench-rows.md
    mkdir -p "$logs"
    : >"$benches"
    xz -dc "$bundle/bin.tar.xz" | tar -C "$work" -xf - || die "could not unpack $bundle/bin.tar.xz"
    (cd "$work/bin" && sha256sum --quiet -c SHA256SUMS) || die "the bundle's binaries do not match their checksums"
    local libpath
    if [ $cpu = 1 ]; then
        FS_CUDA_LINK=1 source tools/cuda_env.sh >/dev/null
        libpath=$FS_CUDA_LIB
    else
        libpath=$(find_libraries) || exit $?
    fi
    # burn's wgpu backend: the system's Vulkan loader, else Debian's from the bundle; the NVIDIA
    # driver's ICD where the image keeps it.
    if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 '; then
        local deb
        deb=$(ls "$bundle"/libvulkan1_*.deb 2>/dev/null | head -n 1)
        if [ -n "$deb" ] && dpkg -x "$deb" "$work/vulkan"; then
            libpath=$libpath:$work/vulkan/usr/lib/x86_64-linux-gnu
        fi
    fi
    local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [ $cpu = 0 ] && [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then
        export VK_DRIVER_FILES=$icd
    fi
    if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
        export XDG_RUNTIME_DIR=$work
    fi
    export LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export FS_FIXTURES_DIR=$root/tests/fixtures RUST_BACKTRACE=0
    local fs=$work/bin/fisher-stein suite=$work/bin/fs-suite-backends
    local missing
    missing=$(ldd "$fs" "$suite" | grep 'not found' | sort -u | tr -s ' \t\n' ' ')
    [ -z "$missing" ] || code=4 die "libraries not found: $missing"
    echo "gpu-check: $(cat "$bundle/MANIFEST" | head -n 1); libraries from $libpath" >&2
    [ $cpu = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2

    step "binary starts" 20 "$fs" --version
    if [ $cpu = 1 ]; then
        # Without a GPU a CUDA request is one line and a non-zero exit, not a hang.
        # stderr must be one line starting "error:", and the exit status non-zero.
        step "cuda:0 without a GPU: one-line refusal" 60 bash -c '
            err=$("$0" bench --shape tiny --layer 2 --device cuda:0 --estimators exact --repeats 1 2>&1 >/dev/null)
            rc=$?
            printf "%s\n" "$err"
            [ $rc -ne 0 ] && [ "$(printf "%s\n" "$err" | grep -c .)" -eq 1 ] && [[ $err == error:* ]]' "$fs"
        cuda=cpu
        [ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || wgpu=
        # The CPU is slower than the GPU at the suite's many small passes.
        limit_scale=4
    fi
    local sizes_gpt2=(--shape gpt2-small --seq-len 256 --positions 256)
    local sizes_gemma=(--shape gemma-3-270m --layer 12 --seq-len 64)
    local sizes_8b=(--shape llama-3.1-8b --layer 16 --seq-len 64)
    if [ $cpu = 1 ]; then
        sizes_gpt2=(--shape tiny --layer 2 --seq-len 16 --positions 16)
        sizes_gemma=(--shape gemma-3-270m --layer 12 --seq-len 8)
        sizes_8b=(--shape smollm2-135m --layer 16 --seq-len 16)
    fi

    # The suite on the devices: the device against the CPU, then each engine's half of the suite.
    if [ $cpu = 0 ]; then
        step "suite: device_agrees_with_cpu, $cuda (candle, dfdx)" 60 \
            env FS_TEST_DEVICE=$cuda "$suite" --include-ignored --exact device_agrees_with_cpu --nocapture
    fi
    if [ -n "$wgpu" ]; then
        step "suite: device_agrees_with_cpu, wgpu (burn)" 45 \
            env FS_TEST_DEVICE=wgpu "$suite" --include-ignored --exact device_agrees_with_cpu --nocapture
    fi
    step "suite: candle on $cuda" 50 env FS_TEST_DEVICE=$cuda "$suite" candle::
    step "suite: dfdx on $cuda" 40 env FS_TEST_DEVICE=$cuda "$suite" dfdx::
    if [ $cpu = 0 ]; then
        step "suite: burn on wgpu" 40 env FS_TEST_DEVICE=wgpu "$suite" burn::
    fi

    # bench: the GPU rows of the README.
    step "bench: ${sizes_gpt2[1]} exact, every position, candle $cuda" 30 \
        "$fs" bench "${sizes_gpt2[@]}" --estimators exact --repeats 1 --backend candle --device $cuda
    step "bench: ${sizes_gpt2[1]} exact, every position, dfdx $cuda" 30 \
        "$fs" bench "${sizes_gpt2[@]}" --estimators exact --repeats 1 --backend dfdx --device $cuda
    if [ -n "$wgpu" ] && [ $cpu = 0 ]; then
        step "bench: ${sizes_gpt2[1]} exact, every position, burn wgpu" 30 \
            "$fs" bench "${sizes_gpt2[@]}" --estimators exact --repeats 1 --backend burn --device wgpu
    fi
    step "bench: ${sizes_gemma[1]} exact, candle $cuda" 30 \
        "$fs" bench "${sizes_gemma[@]}" --estimators exact,sampled --repeats 3 --backend candle --device $cuda
    step "bench: ${sizes_8b[1]} top-16 vs exact, candle $cuda" 110 \
        "$fs" bench "${sizes_8b[@]}" --estimators top-k,exact --repeats 1 --backend candle --device $cuda

    local report=$work/gpu-check.md
    {
        echo "# fisher-stein GPU check ($([ $cpu = 1 ] && echo 'CPU dry run' || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1))"
        echo
        sed 's/^/    /' "$bundle/MANIFEST"
        echo
        echo "| check | result | wall | what it found |"
        echo "|---|---|---|---|"
        printf '%s\n' "${rows[@]}"
        echo
        echo "| shape | layer | T | positions | estimator | backend | time/position | GFLOP/s | peak RSS |"
        echo "|---|---|---|---|---|---|---|---|---|"
        cat "$benches"
    } >"$report"
    cat "$report"
    if [ -n "${OUT:-}" ]; then
        cp "$report" "$OUT/gpu-check.md"
        tar -C "$work" -czf "$OUT/gpu-check-logs.tar.gz" logs
    fi
    [ $failed = 0 ] || die "some checks failed: the logs are in $logs"
}

case "${1:-}" in
    build) build ;;
    run) shift; run "$@" ;;
    *) die "usage: tools/gpu-check.sh build | run [--cpu]" ;;
esac
