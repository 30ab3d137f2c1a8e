#!/usr/bin/env bash
# The end-to-end RLHF demo (pretrain -> preferences -> reward model -> REINFORCE -> evaluate).
#
#   bash scripts/demo.sh [rlhf-ref demo options, e.g. --quick, --seed 1, --out runs/mine, --backend numba]
#
# Creates (or reuses) the virtual environment RLHF_REF_VENV (default .venv in the repo root) and
# installs rlhf_ref with every optional extra. The Cython kernels are built when a C compiler is
# present; without one the demo still runs (on Numba or NumPy) and `rlhf-ref info` says why.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${RLHF_REF_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*"; }

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
"${PIP[@]}" install --quiet --upgrade pip

step "install rlhf_ref with every optional extra (editable)"
"${PIP[@]}" install --quiet -e ".[all]"

# The numba kernels compile once into Numba's on-disk cache (about a minute, for the demo's dtype:
# float32 unless --dtype says otherwise), not at the demo's first call; under a second when the
# cache is already warm. A failure here is not fatal: the demo then runs on another backend or
# compiles at its first call.
DTYPE=float32
prev=
for a in "$@"; do
    if [ "$prev" = --dtype ]; then DTYPE=$a; fi
    case "$a" in --dtype=*) DTYPE=${a#--dtype=} ;; esac
    prev=$a
done
step "rlhf-ref warmup --dtype $DTYPE"
"$VENV/bin/rlhf-ref" warmup --dtype "$DTYPE" || echo "rlhf-ref warmup failed (see above); the demo runs anyway"

step "rlhf-ref demo $*"
exec "$VENV/bin/rlhf-ref" demo "$@"
