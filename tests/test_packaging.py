"""Packaging, the backend registry and the command line.

* ``import rlhf_ref`` (and every NumPy-only module) imports none of the optional packages;
* ``rlhf-ref info`` runs and names every backend;
* ``RLHF_REF_REQUIRE_BACKENDS=numpy,cython,...`` (set by scripts/test.sh) makes a backend that
  silently is not there a FAILURE, not a skip;
* an unavailable backend asked for by name raises ``BackendUnavailable`` with the reason;
* a broken numba leaves the package importable and the reference working;
* setup.py: a build without a compiler still makes a wheel (and says why it has no kernels),
  the strict switch turns that into an error, and with a compiler a .pyx that cimports SciPy's
  BLAS through typed memoryviews builds, imports, computes and leaves the FPU mode alone.

Subprocesses run with the same interpreter and see the same ``rlhf_ref`` as this process
(its parent folder goes first on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import rlhf_ref
from rlhf_ref import backends
from rlhf_ref.backends import BackendUnavailable

PKG_DIR = Path(rlhf_ref.__file__).resolve().parent
ROOT = PKG_DIR.parent                        # the folder that holds the imported rlhf_ref
HEAVY = ("numba", "llvmlite", "scipy", "torch", "gymnasium", "matplotlib", "Cython")
EXCLUDED = ("rlhf_ref.envs", "rlhf_ref.plot")                        # optional parts, by design
KERNELS = r"rlhf_ref\._core\.(_\w+_(nb|cy|cuda)|_nb_common)$"         # the kernels (numba, scipy), by design


def run_py(code, *args, env=None, cwd=None, timeout=300):
    """Run ``python -c code`` with this interpreter, seeing this rlhf_ref; returns CompletedProcess."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def check(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------------------------
# (a) NumPy alone

IMPORT_ALL = """
    import importlib, json, pkgutil, re, sys
    EXCLUDED = {excluded!r}
    KERNELS = {kernels!r}

    def walk(pkg):
        for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            if any(m.name == x or m.name.startswith(x + ".") for x in EXCLUDED) or re.match(KERNELS, m.name):
                continue
            mod = importlib.import_module(m.name)
            yield m.name
            if m.ispkg:
                yield from walk(mod)

    import rlhf_ref
    names = ["rlhf_ref"] + list(walk(rlhf_ref))
    heavy = sorted(h for h in {heavy!r} if h in sys.modules)
    print(json.dumps({{"modules": names, "heavy": heavy}}))
"""


def test_import_needs_numpy_alone():
    out = check(run_py(IMPORT_ALL.format(excluded=EXCLUDED, kernels=KERNELS, heavy=HEAVY)))
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"rlhf_ref.backends", "rlhf_ref.cli", "rlhf_ref._core._backend_numpy", "rlhf_ref._core._backend_cython",
            "rlhf_ref._core._host", "rlhf_ref._core._blas", "rlhf_ref.__main__"} <= set(res["modules"])
    assert res["heavy"] == [], (f"importing {len(res['modules'])} rlhf_ref modules imported optional "
                                f"packages {res['heavy']}; import them inside the functions that need them")


def test_backends_module_imports_no_backend():
    code = """
        import sys, rlhf_ref.backends, rlhf_ref.cli
        print(sorted(m for m in sys.modules if m.startswith("rlhf_ref._core") or m == "numba"))
    """
    assert check(run_py(code)).stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# (b) rlhf-ref info and the command line

def _assert_info(text):
    assert f"rlhf_ref {rlhf_ref.__version__}" in text
    for name in backends.NAMES:
        assert any(line.split()[:1] == [name] for line in text.splitlines()), f"backend {name} not listed:\n{text}"
    assert "numpy" in text and "python" in text


def test_info_python_m():
    out = check(subprocess.run([sys.executable, "-m", "rlhf_ref", "info"], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300))
    _assert_info(out.stdout)


def test_info_import_check_reports_every_optional_package():
    """`rlhf-ref info --import-check` imports each installed optional package (it once raised NameError)."""
    out = check(subprocess.run([sys.executable, "-m", "rlhf_ref", "info", "--no-probe", "--import-check"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300))
    assert "numpy" in out.stdout and "Traceback" not in out.stderr


def test_info_console_script():
    script = Path(sys.executable).with_name("rlhf-ref")
    if not script.exists():
        if os.environ.get("RLHF_REF_REQUIRE_BACKENDS"):
            pytest.fail(f"the console script {script} is not installed (pip install -e . should make it)")
        pytest.skip(f"rlhf_ref is not installed in this environment ({script} missing)")
    _assert_info(check(subprocess.run([str(script), "info"], capture_output=True, text=True, timeout=300)).stdout)


def test_info_in_process_and_help_import_nothing_heavy():
    code = """
        import io, sys, contextlib
        from rlhf_ref.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["info", "--no-probe"]) == 0
            try:
                main(["--help"])
            except SystemExit as e:
                assert e.code == 0
        print(sorted(h for h in {heavy!r} if h in sys.modules))
        print("demo" in buf.getvalue() and "not probed" in buf.getvalue())
    """
    out = check(run_py(code.format(heavy=HEAVY))).stdout.split("\n")
    assert out[-3:-1] == ["[]", "True"], out


@pytest.mark.parametrize("argv", [["bogus"], [], ["info", "--bogus"]])
def test_bad_arguments_exit_2(argv, capsys):
    from rlhf_ref.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: rlhf-ref" in capsys.readouterr().err


def test_every_command_module_exposes_its_functions():
    import importlib
    from rlhf_ref.cli import COMMANDS
    for cmd in COMMANDS:
        try:
            mod = importlib.import_module(cmd.module)
        except ModuleNotFoundError as e:
            if e.name == cmd.module:
                pytest.fail(f"COMMANDS lists {cmd.name!r} but {cmd.module} does not exist")
            raise
        impl = cmd.load()
        assert callable(impl.add_arguments) and callable(impl.main), cmd


# ---------------------------------------------------------------------------------------------
# (c) required backends are really there (CI: scripts/test.sh sets RLHF_REF_REQUIRE_BACKENDS)

REQUIRED = [n.strip() for n in os.environ.get("RLHF_REF_REQUIRE_BACKENDS", "").split(",") if n.strip()]


@pytest.mark.skipif(not REQUIRED, reason="RLHF_REF_REQUIRE_BACKENDS is not set (scripts/test.sh sets it)")
@pytest.mark.parametrize("name", REQUIRED or ["-"])
def test_required_backend_is_available(name):
    assert name in backends.NAMES, f"RLHF_REF_REQUIRE_BACKENDS names unknown backend {name!r}"
    st = backends.status(name)
    assert st.available, f"backend {name!r} is required (RLHF_REF_REQUIRE_BACKENDS) but unavailable: {st.reason}"
    mod = backends.get(name)
    assert mod.__name__ == backends.MODULES[name]
    assert getattr(mod, "NAME", name) == name


# ---------------------------------------------------------------------------------------------
# (d) the registry

def test_available_lists_every_backend_with_a_reason():
    st = backends.available()
    assert tuple(st) == backends.NAMES
    for name, s in st.items():
        assert isinstance(s, backends.Status) and isinstance(s.available, bool)
        assert (s.reason is None) == s.available, (name, s)
        ok, why = s                                   # a (bool, reason) tuple, too
        assert ok == s.available and why == s.reason
    assert st["numpy"] == (True, None)


def test_unavailable_backend_raises_with_its_reason(monkeypatch):
    import rlhf_ref._core._backend_numpy as np_backend
    monkeypatch.setattr(np_backend, "probe", lambda: "simulated breakage for the test")
    st = backends.status("numpy")
    assert st == (False, "simulated breakage for the test")
    with pytest.raises(BackendUnavailable, match="'numpy' is unavailable: simulated breakage") as e:
        backends.get("numpy")
    assert isinstance(e.value, RuntimeError) and e.value.reason == "simulated breakage for the test"


def test_probe_that_raises_is_a_reason(monkeypatch):
    import rlhf_ref._core._backend_numpy as np_backend

    def boom():
        raise OSError("driver exploded")
    monkeypatch.setattr(np_backend, "probe", boom)
    assert backends.status("numpy") == (False, "probe() failed: OSError: driver exploded")


def test_missing_backend_module_is_not_implemented(monkeypatch):
    monkeypatch.setitem(backends.MODULES, "cython", "rlhf_ref._core._backend_does_not_exist")
    st = backends.status("cython")
    assert not st.available and st.reason.startswith("not implemented in this build")
    with pytest.raises(BackendUnavailable, match="not implemented in this build"):
        backends.get("cython")


def test_missing_compiled_extension_reason(monkeypatch, tmp_path):
    (tmp_path / "fake_backend_cy.py").write_text("from rlhf_ref._core import _nope_cy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.MODULES, "cython", "fake_backend_cy")
    st = backends.status("cython")
    assert st.reason == ("compiled extension rlhf_ref._core._nope_cy not built "
                         "(install with a C compiler and Cython; see setup.py)")


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        backends.get("fortran")
    with pytest.raises(ValueError, match="job must be one of"):
        backends.get("auto", job="inference")


def test_auto_order_policy():
    assert backends.auto_order("train") == ("cython", "numba", "numpy")
    assert backends.auto_order("rollout") == ("cython", "numba", "numpy")
    assert backends.auto_order("rollout", 10_000) == ("cython", "numba", "numpy")           # no GPU
    assert backends.auto_order("rollout", 10_000, gpu=True)[0] == "cuda"
    assert backends.auto_order("rollout", backends.CUDA_MIN_BATCH - 1, gpu=True)[0] != "cuda"
    assert "cuda" not in backends.auto_order("train", 10_000, gpu=True)


def test_auto_skips_unavailable_and_incomplete_backends(monkeypatch):
    import types
    fake = types.ModuleType("fake_rollout_only")
    fake.NAME = "cython"
    fake.IMPLEMENTED = frozenset({"rollout", "sequence_logprobs"})
    fake.probe = lambda: None
    for f in backends.INTERFACE:
        setattr(fake, f, lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "fake_rollout_only", fake)
    monkeypatch.setitem(backends.MODULES, "cython", "fake_rollout_only")
    assert backends.get("auto", job="rollout") is fake
    trained = backends.get("auto", job="train")                 # fake lacks training: numba or numpy
    assert trained is not fake and trained.__name__ in (backends.MODULES["numba"], backends.MODULES["numpy"])
    import rlhf_ref._core._backend_numpy as np_backend
    monkeypatch.setattr(np_backend, "probe", lambda: "simulated")
    monkeypatch.setitem(backends.MODULES, "numba", "rlhf_ref._core._backend_does_not_exist")
    with pytest.raises(BackendUnavailable, match="no backend can run job 'train'.*numpy: simulated"):
        backends.get("auto", job="train")


def test_numpy_backend_is_the_reference():
    from rlhf_ref import reinforce, reward_model, rollout, sft
    be = backends.get("numpy")
    assert be.rollout is rollout.rollout
    assert be.sequence_logprobs is reinforce.sequence_logprobs
    assert be.reinforce_loss_and_grad is reinforce.loss_and_grad
    assert be.sft_loss_and_grad is sft.loss_and_grad
    assert be.bt_loss_and_grad is reward_model.bt_loss_and_grad
    for f in backends.INTERFACE:
        assert callable(getattr(be, f)) and f in dir(be)
    with pytest.raises(AttributeError):
        be.no_such_function


# ---------------------------------------------------------------------------------------------
# (e) a broken numba

BROKEN_NUMBA = """
    import sys
    if sys.argv[1] == "blocked":
        sys.modules["numba"] = None                 # `import numba` now raises ImportError
    import numpy as np
    import rlhf_ref
    from rlhf_ref import backends, lstm
    st = backends.available()
    assert not st["numba"].available and st["numba"].reason, st["numba"]
    assert not st["cuda"].available and st["cuda"].reason, st["cuda"]
    assert st["numpy"] == (True, None), st["numpy"]
    try:
        backends.get("numba")
    except backends.BackendUnavailable as e:
        assert e.reason == st["numba"].reason
    else:
        raise AssertionError("get('numba') did not raise")
    be = backends.get("auto", job="rollout")
    assert be.NAME in ("numpy", "cython"), be
    rng = np.random.default_rng(0)
    B, T, V = 3, 6, 7
    params = lstm.init_params(V, 4, 5, rng, heads=("head", "value"))
    prompt = np.zeros((B, T), np.int64); prompt[:, 0] = 1
    out = backends.get("numpy").rollout(params, prompt, np.ones(B, np.int64), rng.random((B, T)))
    assert out["tokens"].shape == (B, T) and np.isfinite(out["logp"]).all()
    print("NUMBA REASON:", st["numba"].reason)
"""


@pytest.mark.parametrize("how", ["blocked", "raises"])
def test_package_works_when_numba_is_broken(how, tmp_path):
    env = {}
    if how == "raises":          # what numba does when NumPy is newer than it supports
        fake = tmp_path / "numba"
        fake.mkdir()
        (fake / "__init__.py").write_text('raise ImportError("Numba needs NumPy 2.5 or less. Got NumPy 9.9.")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    out = check(run_py(BROKEN_NUMBA, how, env=env)).stdout
    if how == "raises":
        assert "Numba needs NumPy 2.5 or less" in out


# ---------------------------------------------------------------------------------------------
# (f) setup.py: optional by default, strict on request; the SciPy-BLAS .pyx recipe builds

PROBE_PYX = '''\
# A build-system probe (tests/test_packaging.py): typed memoryviews, a fused type, SciPy's BLAS
# through cython_blas, and prange (OpenMP when setup.py found it).
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm, dgemm

ctypedef fused real:
    float
    double

def gemm(real[:, ::1] a, real[:, ::1] b, real[:, ::1] c):
    """c = a @ b (row-major) as the column-major BLAS call c^T = b^T a^T."""
    cdef int m = a.shape[0], k = a.shape[1], n = b.shape[1]
    cdef char t = b'N'
    cdef real one = 1, zero = 0
    if real is float:
        sgemm(&t, &t, &n, &m, &k, &one, &b[0, 0], &n, &a[0, 0], &k, &zero, &c[0, 0], &n)
    else:
        dgemm(&t, &t, &n, &m, &k, &one, &b[0, 0], &n, &a[0, 0], &k, &zero, &c[0, 0], &n)

def rowsum(const double[:, ::1] x, double[::1] out):
    cdef Py_ssize_t i, j
    cdef double s
    for i in prange(x.shape[0], nogil=True):
        s = 0
        for j in range(x.shape[1]):
            s = s + x[i, j]
        out[i] = s
'''


def _project_copy(dst: Path) -> Path:
    """The buildable project (pyproject, setup.py, README, rlhf_ref) with ONLY the probe .pyx."""
    src = ROOT
    if not (src / "setup.py").exists() or not (src / "pyproject.toml").exists():
        pytest.skip(f"rlhf_ref is not imported from a source tree ({src}): nothing to build")
    dst.mkdir()
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(src / f, dst / f)
    shutil.copytree(src / "rlhf_ref", dst / "rlhf_ref",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.pyx", "*.c", "*.html"))
    (dst / "rlhf_ref" / "_core" / "_probe_cy.pyx").write_text(PROBE_PYX)
    return dst


def _pip_wheel(proj: Path, out: Path, **env):
    pytest.importorskip("Cython", reason="the test extra installs Cython (--no-build-isolation needs it)")
    e = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_REF_")}
    e.update(env)
    return subprocess.Popen([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                             "--no-index", str(proj), "-w", str(out)], cwd=proj, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wheel(out: Path) -> Path:
    wheels = list(out.glob("rlhf_ref-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _build_all(base: Path, cases: dict) -> dict:
    """Build one wheel per case side by side (in parallel); {case: (rc, log, wheel dir, project)}."""
    import setuptools
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (the test extra installs a newer one)")
    procs = {}
    for name, env in cases.items():
        proj = _project_copy(base / name)
        procs[name] = (proj, base / f"{name}-wheels", _pip_wheel(proj, base / f"{name}-wheels", **env))
    res = {}
    for name, (proj, out, p) in procs.items():
        log, _ = p.communicate(timeout=600)
        res[name] = (p.returncode, log, out, proj)
    return res


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """No compiler (CC=/nonexistent/gcc): optional by default, and strict (~10 s)."""
    return _build_all(tmp_path_factory.mktemp("builds"), {
        "nocompiler": {"CC": "/nonexistent/gcc"},
        "strict_nocompiler": {"CC": "/nonexistent/gcc", "RLHF_REF_REQUIRE_EXT": "1"},
    })


@pytest.fixture(scope="module")
def builds_compiled(tmp_path_factory):
    """With the compiler (cythonize + gcc), and RLHF_REF_PUREPYTHON=1 (~15 s)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    return _build_all(tmp_path_factory.mktemp("builds_compiled"), {
        "compiled": {},
        "pure": {"RLHF_REF_PUREPYTHON": "1"},
    })


def test_build_without_compiler_succeeds_and_says_why(builds):
    rc, log, out, _ = builds["nocompiler"]
    assert rc == 0, log
    assert "compiled kernels not built" in log and "rlhf_ref._core._probe_cy" in log, log
    names = zipfile.ZipFile(_wheel(out)).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
    assert "rlhf_ref/data/corpus.txt" in names


def test_strict_build_without_compiler_fails(builds):
    rc, log, _, _ = builds["strict_nocompiler"]
    assert rc != 0, log


@pytest.mark.slow
def test_purepython_build_is_a_pure_wheel(builds_compiled):
    rc, log, out, _ = builds_compiled["pure"]
    assert rc == 0, log
    assert _wheel(out).name.endswith("-py3-none-any.whl")


@pytest.mark.slow
def test_compiled_build_ships_the_kernel_and_nothing_generated(builds_compiled):
    rc, log, out, proj = builds_compiled["compiled"]
    assert rc == 0, log
    assert "compiled kernels not built" not in log, log
    whl = _wheel(out)
    names = zipfile.ZipFile(whl).namelist()
    so = [n for n in names if n.startswith("rlhf_ref/_core/_probe_cy") and n.endswith((".so", ".pyd"))]
    assert len(so) == 1, names
    assert not [n for n in names if n.endswith((".c", ".cpp", ".html", ".pyx", ".nbi", ".nbc"))], names
    assert "rlhf_ref/data/corpus.txt" in names and "rlhf_ref/backends.py" in names
    assert "rlhf_ref.cli:main" in zipfile.ZipFile(whl).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert not list((proj / "rlhf_ref").rglob("*.c")), "generated C next to the .pyx (build_dir not used?)"
    # Import the built kernel from the unpacked wheel: SciPy's BLAS through cython_blas, prange,
    # and the FPU mode untouched (no fast math).
    site = out / "site"
    zipfile.ZipFile(whl).extractall(site)
    code = """
        import numpy as np, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import fpu_mode
        before = fpu_mode()
        from rlhf_ref._core import _probe_cy as k
        assert k.__file__.startswith(sys.argv[2]), k.__file__
        rng = np.random.default_rng(0)
        for dt in (np.float32, np.float64):
            a, b = rng.random((3, 4)).astype(dt), rng.random((4, 5)).astype(dt)
            c = np.empty((3, 5), dt)
            k.gemm(a, b, c)
            np.testing.assert_allclose(c, a @ b, rtol=10 * np.finfo(dt).eps)
        x = rng.random((7, 9)); s = np.empty(7)
        k.rowsum(x, s)
        np.testing.assert_allclose(s, x.sum(1), rtol=1e-14)
        assert "scipy.linalg.cython_blas" in sys.modules
        assert fpu_mode() == before == (True, True), (before, fpu_mode())
        print("OK")
    """
    env = {**os.environ, "PYTHONPATH": str(site)}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(Path(__file__).parent), str(site)],
                       env=env, cwd=site, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout + p.stderr
    if "OpenMP: yes" in log:
        p = subprocess.run(["ldd", *[str(site / n) for n in so]], capture_output=True, text=True)
        assert p.returncode != 0 or "gomp" in p.stdout or "omp" in p.stdout, p.stdout
