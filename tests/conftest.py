"""Test configuration shared by every test file.

* Hypothesis profiles: ``ci`` (deterministic: derandomize, no example database, no deadline,
  50 examples, failing examples printed as a reproduction blob) and ``dev`` (no deadline: the
  first call of a numba kernel compiles for ~0.3 s, which a deadline would call flaky; 30 examples).
  ``HYPOTHESIS_PROFILE`` picks one (default ``dev``; scripts/test.sh sets ``ci``).
* ``slow`` tests are skipped unless ``--runslow`` is given; ``cuda`` tests are skipped unless
  ``numba.cuda.is_available()`` (a GPU, or ``NUMBA_ENABLE_CUDASIM=1`` set before Python starts).
  Skipping rather than deselecting: the reason is printed (``-ra``) and a run never ends in
  "no tests collected".
* Every test fails if the floating-point mode of the process is not IEEE after it: a shared
  library compiled with ``-ffast-math`` sets flush-to-zero / denormals-are-zero for the whole
  process when loaded, silently changing every later result (NumPy's conftest does the same).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

try:
    from hypothesis import settings
except ImportError:                 # the test extra is not installed: property tests will say so
    settings = None

if settings is not None:
    settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                              max_examples=50)
    settings.register_profile("dev", deadline=None, max_examples=30)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


_CUDA_WHY = "unprobed"


def _cuda_skip_reason():
    """None when numba.cuda can run kernels here (a GPU or the simulator), else why not (probed once)."""
    global _CUDA_WHY
    if _CUDA_WHY == "unprobed":
        try:
            from numba import cuda
            ok = bool(cuda.is_available())
            _CUDA_WHY = None if ok else "no CUDA GPU; set NUMBA_ENABLE_CUDASIM=1 to use the simulator"
        except Exception as e:      # numba not installed, or refusing this NumPy, or a driver error
            _CUDA_WHY = f"numba.cuda not usable ({type(e).__name__}: {e}); pip install 'rlhf-ref[cuda]'"
    return _CUDA_WHY


def pytest_configure(config):
    # scripts/test.sh (CI) installs torch for the cross-checks: there a missing torch is an error,
    # never a quiet skip of every torch-marked test.
    if os.environ.get("RLHF_REF_REQUIRE_TORCH") == "1":
        try:
            import torch  # noqa: F401
        except Exception as e:
            raise pytest.UsageError(f"RLHF_REF_REQUIRE_TORCH=1 but torch cannot be imported: {e}")


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow")
    skip_slow = pytest.mark.skip(reason="slow test: use --runslow to run it")
    cuda_reason = None
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords:
            if cuda_reason is None:
                cuda_reason = _cuda_skip_reason() or ""
            if cuda_reason:
                item.add_marker(pytest.mark.skip(reason=cuda_reason))


def fpu_mode():
    """(subnormals kept in float64, in float32): both True under the IEEE default mode.

    Flush-to-zero turns a subnormal result into 0 (tiny / 4); denormals-are-zero reads a subnormal
    input as 0 (5e-324 > 0 becomes False).
    """
    tiny64 = np.float64(2.2250738585072014e-308)          # smallest normal float64
    tiny32 = np.float32(1.17549435e-38)                   # smallest normal float32
    keep64 = bool(np.float64(5e-324) > 0) and bool(tiny64 / np.float64(4) != 0) and 5e-324 > 0.0
    keep32 = bool(np.float32(1e-45) > 0) and bool(tiny32 / np.float32(4) != 0)
    return keep64, keep32


_IEEE = (True, True)


@pytest.fixture(autouse=True)
def _check_fpu_mode():
    before = fpu_mode()
    if before != _IEEE:
        pytest.fail(f"the floating-point mode was already not IEEE before this test (subnormals kept in "
                    f"float64/float32: {before}): something imported earlier (a library built with "
                    f"-ffast-math?) set flush-to-zero / denormals-are-zero", pytrace=False)
    yield
    after = fpu_mode()
    if after != _IEEE:
        pytest.fail(f"the floating-point mode changed during this test (subnormals kept in float64/float32: "
                    f"{after}): a library built with -ffast-math sets flush-to-zero / denormals-are-zero for "
                    f"the whole process when it is loaded", pytrace=False)
