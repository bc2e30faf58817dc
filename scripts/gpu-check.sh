#!/usr/bin/env bash
# The one script the GPU machine runs: install vsa_nd in place (no network), show the card and
# versions, compile every kernel with NVRTC, run the GPU tests, run a small subset of them under
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck), then the benchmarks; keep going after a failing
# step, print a short summary last and exit non-zero if any step failed.
#
#   bash scripts/gpu-check.sh [benchmark scripts...]
#
# Arguments: benchmark scripts to run (default: every benchmarks/bench_*.py that uses CuPy).
# Environment:
#   OUT                where logs go (default: a new folder under /tmp); six files at most
#   VSA_ND_TESTS       pytest paths for the GPU tests (default: tests)
#   VSA_ND_SANITIZE    pytest -k expression run under compute-sanitizer (default: smoke);
#                      empty skips the sanitizer
#   VSA_ND_SANITIZE_TESTS  pytest paths for it (default: the ops, attention and backward tests,
#                      whose smoke tests are there for the sanitizer)
#   VSA_ND_SANITIZE_TOOLS  compute-sanitizer tools to run (default: memcheck racecheck initcheck
#                      synccheck; initcheck reports reads of device memory nothing wrote, which
#                      is why the sanitizer runs with CuPy's memory pool off)
#   VSA_ND_SANITIZE_PROFILE  hypothesis profile of the property tests the sanitizer runs
#                      (default: sanitize, 5 examples each; e.g. VSA_ND_SANITIZE="smoke or
#                      matches_reference" with tests/test_cuda_backward.py)
#   VSA_ND_BENCH_ARGS  extra arguments for every benchmark (e.g. "--shapes main")
#   (the test and sanitizer steps set VSA_ND_REQUIRE_GPU=1: tests/conftest.py then stops with an
#   error if the GPU tests cannot run, instead of skipping them all)
#   VSA_COMMIT         the commit the benchmark tables name (set it from this checkout: the
#                      GPU machine's copy of .git may be older than the tree it runs)
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/vsa_nd-gpu-check.XXXXXX)}
mkdir -p "$OUT"
TESTS=${VSA_ND_TESTS:-tests}
SANITIZE=${VSA_ND_SANITIZE-smoke}
SANITIZE_TESTS=${VSA_ND_SANITIZE_TESTS:-tests/test_cuda_ops.py tests/test_cuda_attention.py tests/test_cuda_backward.py}
SUMMARY=()
FAILED=0

# step NAME LOG COMMAND...: run COMMAND with its output shown and appended to $OUT/LOG.
step() {
    local name=$1 log=$OUT/$2
    shift 2
    echo "=== $name" | tee -a "$log"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "$log"; then
        SUMMARY+=("ok      $name ($((SECONDS - start)) s)")
    else
        SUMMARY+=("FAILED  $name ($((SECONDS - start)) s, see $(basename "$log"))")
        FAILED=1
    fi
}

install() {
    if python3 -m pip install --no-deps --no-build-isolation --no-index -q -e .; then
        echo "installed vsa_nd in place (editable)"
    else
        # vsa_nd.kernels finds cuda_kernels/ in the source tree when the package is not installed.
        echo "editable install failed: using PYTHONPATH=$PWD"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -c "import vsa_nd, vsa_nd.kernels as k; print('vsa_nd', vsa_nd.__version__, 'kernels in', k.KERNEL_DIR)"
}

versions() {
    nvidia-smi
    python3 - <<'EOF'
import sys, numpy, cupy
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| cupy", cupy.__version__)
print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "| driver", cupy.cuda.runtime.driverGetVersion())
for i in range(cupy.cuda.runtime.getDeviceCount()):
    p = cupy.cuda.runtime.getDeviceProperties(i)
    print(f"device {i}: {p['name'].decode()}, cc {p['major']}.{p['minor']}, {p['multiProcessorCount']} SMs")
EOF
}

# Install changes the environment of later steps, so it runs in this shell, logging to setup.log.
echo "=== install" | tee -a "$OUT/setup.log"
install > >(tee -a "$OUT/setup.log") 2>&1 || { SUMMARY+=("FAILED  install"); FAILED=1; }
step "nvidia-smi and versions" setup.log versions
step "NVRTC compile check" compile.log python3 -m vsa_nd.compile_check
step "GPU tests ($TESTS)" tests.log env VSA_ND_REQUIRE_GPU=1 HYPOTHESIS_PROFILE=gpu python3 -m pytest -m gpu -q -p no:cacheprovider $TESTS

if [ -n "$SANITIZE" ]; then
    SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in ${VSA_ND_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
        step "compute-sanitizer $tool (-k '$SANITIZE')" sanitizer.log \
            env VSA_ND_REQUIRE_GPU=1 VSA_ND_CUPY_POOL=0 HYPOTHESIS_PROFILE="${VSA_ND_SANITIZE_PROFILE:-sanitize}" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            python3 -m pytest -m gpu -q -p no:cacheprovider -k "$SANITIZE" $SANITIZE_TESTS
    done
fi

if [ $# -gt 0 ]; then
    BENCHES=("$@")
else
    mapfile -t BENCHES < <(grep -l "import cupy" benchmarks/bench_*.py 2>/dev/null)
fi
for bench in "${BENCHES[@]}"; do
    step "benchmark $bench" bench.log python3 "$bench" ${VSA_ND_BENCH_ARGS:-}
done

{
    echo
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed)|ERROR SUMMARY" "$OUT/tests.log" "$OUT/sanitizer.log" 2>/dev/null | tail -n 30
} | tee "$OUT/summary.txt"
exit $FAILED
