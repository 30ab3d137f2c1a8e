#!/usr/bin/env bash
# The tests, as CI runs them (.ci/run): build the Cython kernels STRICTLY, install every extra and
# torch, then run the whole suite, the CUDA kernels under Numba's simulator, and the benchmark
# smoke check.
#
#   bash scripts/test.sh [extra pytest arguments for the main run, e.g. -x -k lstm]
#
# Environment: RLHF_REF_VENV (default .venv in the repo root; reused when present),
# PYTHON (the interpreter that creates the venv; default python3),
# RLHF_REF_REQUIRE_BACKENDS (default: numpy, numba, and cython once rlhf_ref/_core has Cython sources),
# RLHF_REF_RUNSLOW (default 1: CI runs the tests marked slow too, they fit its 90 minutes; 0 skips them).
#
# Why an EDITABLE install: setuptools builds the extensions in place, so the .so files sit next to
# the sources and `python -m pytest`, which puts the repo root first on sys.path, imports the BUILT
# package. With a non-editable install the same command would import the source tree, which has no
# .so, and every Cython test would quietly exercise the NumPy fallback (or skip). The suite also
# checks it: tests/test_packaging.py fails when a backend named in RLHF_REF_REQUIRE_BACKENDS is
# unavailable, so a silent fallback cannot pass.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${RLHF_REF_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
START=$SECONDS

step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - START))" "$*"; }

step "virtual environment: $VENV"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "reusing $VENV ($("$VENV/bin/python" --version))"
else
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "rlhf_ref needs Python >= 3.10, this is " + sys.version'
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "created $VENV ($("$VENV/bin/python" --version))"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off

step "upgrade pip"
"${PIP[@]}" install --upgrade pip

step "install rlhf_ref (editable, extras all+test) with RLHF_REF_REQUIRE_EXT=1: the Cython kernels must build"
RLHF_REF_REQUIRE_EXT=1 "${PIP[@]}" install -e ".[all,test]"

step "install torch==2.13.0 (test-only: PyTorch cross-checks)"
"${PIP[@]}" install torch==2.13.0

step "install the ray extra (not in all: ~240 MB; tests/test_distributed.py runs on a local Ray cluster)"
"${PIP[@]}" install "ray==2.60.0"    # the version the tests were run with; the extra says ray>=2.40

step "install the frameworks extra (not in all: ~470 MB; tests/test_frameworks.py checks SB3's and TRL's real functions)"
"${PIP[@]}" install "stable-baselines3==2.9.2" "trl==1.16.0"

step "rlhf-ref info"
"$VENV/bin/rlhf-ref" info

# Every numba kernel compiled once into the cache beside the sources (the suite's numba tests then
# load them instead of compiling each at its first call); it must work here: numba is installed.
step "rlhf-ref warmup"
"$VENV/bin/rlhf-ref" warmup

# Backends that must be available: numpy always; numba (the numba extra is installed); cython as
# soon as the tree has Cython sources or the cython backend module. Becomes strict by itself.
if [ -z "${RLHF_REF_REQUIRE_BACKENDS:-}" ]; then
    req=numpy
    if compgen -G "rlhf_ref/_core/*.pyx" >/dev/null || [ -f rlhf_ref/_core/_backend_cython.py ]; then req+=,cython; fi
    if [ -f rlhf_ref/_core/_backend_numba.py ]; then req+=,numba; fi
    RLHF_REF_REQUIRE_BACKENDS=$req
fi
export RLHF_REF_REQUIRE_BACKENDS
export HYPOTHESIS_PROFILE=ci
export RLHF_REF_REQUIRE_TORCH=1     # torch was installed above: its cross-checks must run
export RLHF_REF_REQUIRE_RAY=1       # and ray: its tests must run, never skip
export RLHF_REF_REQUIRE_FRAMEWORKS=1  # and the frameworks extra: tests/test_frameworks.py must run
SLOW=()
if [ "${RLHF_REF_RUNSLOW:-1}" != 0 ]; then SLOW=(--runslow); fi

# The main suite. pytest's exit code 5 ("no tests collected") is a failure here: it means the
# suite was mis-collected. set -e stops the script on any non-zero code.
step "pytest: the main suite (RLHF_REF_REQUIRE_BACKENDS=$RLHF_REF_REQUIRE_BACKENDS, HYPOTHESIS_PROFILE=ci ${SLOW[*]:-})"
"$PY" -m pytest ${SLOW[@]+"${SLOW[@]}"} "$@"

# The Cython kernels once more, built with bounds checks (RLHF_REF_CYTHON_DEBUG=1) and AddressSanitizer
# (RLHF_REF_ASAN=1), on the equivalence, hostile-input and kernel-safety suites (issue 10). The build
# goes into a temporary copy of the tree, so the in-place release build the rest of the suite uses is
# untouched; the tests run from that copy (its root first on sys.path, its subprocesses too), and
# tests/test_kernel_safety.py checks with RLHF_REF_EXPECT_DEBUG_BUILD=1 that they imported it. Python
# is not built with ASan, so libasan is preloaded (leak checks off: CPython's own allocations).
if [ -f rlhf_ref/_core/_backend_cython.py ] && command -v gcc >/dev/null; then
    step "Cython bounds-check + AddressSanitizer build: equivalence, hostile and kernel-safety suites"
    DBG=$(mktemp -d)
    tar --exclude='*.so' --exclude='__pycache__' -cf - rlhf_ref tests setup.py pyproject.toml README.md | tar -xf - -C "$DBG"
    (cd "$DBG" && RLHF_REF_REQUIRE_EXT=1 RLHF_REF_CYTHON_DEBUG=1 RLHF_REF_ASAN=1 "$PY" setup.py -q build_ext --inplace)
    rc=0
    (cd "$DBG" && LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
        RLHF_REF_EXPECT_DEBUG_BUILD=1 RLHF_REF_HOSTILE_BACKENDS=cython PYTHONPATH="$DBG" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_hostile.py \
        tests/test_equivalence.py tests/test_kernel_safety.py -k "cython or hostile") || rc=$?
    rm -rf "$DBG"
    if [ "$rc" -ne 0 ]; then
        echo "the bounds-check/ASan build's suites failed with exit code $rc" >&2
        exit "$rc"
    fi
fi

# The CUDA kernels under Numba's simulator (it must be set before Python starts). Exit code 5 is
# accepted only while no test file uses the cuda marker; once one does, it is a failure.
step "pytest -m cuda under NUMBA_ENABLE_CUDASIM=1"
rc=0
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest ${SLOW[@]+"${SLOW[@]}"} -m cuda || rc=$?
if [ "$rc" -eq 5 ] && ! grep -rqE 'mark\.cuda\b' tests --include='*.py'; then
    echo "no cuda-marked tests yet: exit code 5 accepted"
    rc=0
fi
if [ "$rc" -ne 0 ]; then
    echo "pytest -m cuda failed with exit code $rc" >&2
    exit "$rc"
fi

if [ -f benchmarks/__main__.py ]; then
    # It checks every backend, PyTorch and JAX (the bench extra) against the reference. JAX has no
    # wheel for Python < 3.11 (pyproject.toml's marker), so there the smoke check runs without it.
    BENCH_ARGS=(--smoke)
    if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then BENCH_ARGS+=(--no-jax); fi
    step "benchmark smoke check: python -m benchmarks ${BENCH_ARGS[*]}"
    "$PY" -m benchmarks "${BENCH_ARGS[@]}"
fi

step "all tests passed"
