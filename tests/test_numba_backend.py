"""The Numba backend (``rlhf_ref._core._backend_numba``): kernel-specific tests.

Equality with the reference over random shapes and conventions is in ``test_equivalence.py``;
here is what only the Numba kernels have: the SIMD exp/σ/tanh and their accuracy, the two
input-projection paths, float32 really computed in float32, bit-identical repeats (in one
process, across processes, and from a cold compile against a warm cache), the on-disk cache
and its salt, and the reasons ``probe()`` gives when numba or SciPy is missing or broken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rlhf_ref import lstm, reinforce, rollout as ref_rollout
from rlhf_ref._core import _backend_numba as nbk, _blas, _config
from rlhf_ref.tokenizer import EOS

WHY = nbk.probe()
needs_numba = pytest.mark.skipif(WHY is not None, reason=f"numba backend unavailable: {WHY}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env=None, timeout=600):
    """Run ``code`` in a fresh interpreter at the repository root; returns its stdout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"subprocess failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def problem(dt=np.float32, B=5, T=9, V=7, E=6, H=8, seed=0):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(V, E, H, rng, heads=("head", "value"), dtype=dt)
    prompt = rng.integers(3, V, (B, T))
    prompt[:, 0] = 1
    pl = rng.integers(1, 4, B)
    u = rng.random((B, T))
    return p, prompt, pl, u


# ---------------------------------------------------------------------------------------------
# availability

def test_probe_reason_when_numba_is_missing():
    out = _run("""
        import sys
        sys.modules["numba"] = None            # import numba now raises ImportError
        import rlhf_ref
        from rlhf_ref._core import _backend_numba as nbk, _blas, _config
        why = nbk.probe()
        print(why)
        try:
            nbk.rollout({}, [[1]], [1], [[0.0]])
        except Exception as e:               # the reference's checks run first: params is not valid
            print(type(e).__name__)
        import numpy as np
        from rlhf_ref import lstm
        p = lstm.init_params(5, 3, 4, np.random.default_rng(0), heads=("head",))
        try:
            nbk.rollout(p, [[1, 1]], [1], [[0.0, 0.5]])
        except RuntimeError as e:
            print("RuntimeError:", e)
    """)
    lines = out.strip().splitlines()
    assert lines[0].startswith("numba import failed") or lines[0] == "numba not installed", lines[0]
    assert lines[-1].startswith("RuntimeError: the numba backend is unavailable: numba"), lines[-1]


def test_probe_reason_when_numba_is_not_installed():
    out = _run("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "numba" or name.startswith("numba."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from rlhf_ref._core import _backend_numba as nbk, _blas, _config
        print(nbk.probe())
    """)
    assert out.strip() == "numba not installed"


def test_probe_reason_when_scipy_is_missing():
    out = _run("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "scipy" or name.startswith("scipy."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from rlhf_ref._core import _backend_numba as nbk, _blas, _config
        print(nbk.probe())
    """)
    assert "scipy" in out and "BLAS" in out, out


def test_importing_the_backend_module_does_not_import_numba():
    out = _run("""
        import sys
        from rlhf_ref._core import _backend_numba
        print("numba" in sys.modules)
    """)
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# SIMD transcendentals

@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_vectorised_exp_sigmoid_tanh_accuracy(dt):
    from rlhf_ref._core import _nb_common as c
    rng = np.random.default_rng(0)
    lim = 80.0 if dt == np.float32 else 700.0
    x = np.concatenate([rng.uniform(-lim, lim, 20000), rng.uniform(-1, 1, 20000), rng.uniform(-1e-6, 1e-6, 2000),
                        np.linspace(-0.7, 0.7, 2001), [0.0, -0.0]]).astype(dt)
    x64 = x.astype(np.float64)
    eps = np.finfo(dt).eps
    tiny = np.finfo(dt).tiny
    for f, ref, max_ulp in ((c.apply_vexp, np.exp, 2.0), (c.apply_vsigmoid, lambda v: 1.0 / (1.0 + np.exp(-v)), 3.0),
                            (c.apply_vtanh, np.tanh, 3.0)):
        out = np.empty_like(x)
        f(x, out)
        r = ref(x64)
        ok = np.abs(r) > tiny
        ulp = np.abs(out[ok] - r[ok]) / np.abs(r[ok]) / eps
        assert ulp.max() <= max_ulp, f"{f.__name__} {np.dtype(dt)}: {ulp.max():.2f} ulp"
        # below the smallest normal the result is 0 or the true tiny value, never garbage
        assert np.all(np.abs(out[~ok] - r[~ok]) <= 2 * tiny)


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_vectorised_math_special_values(dt):
    from rlhf_ref._core import _nb_common as c
    big = 100.0 if dt == np.float32 else 1000.0
    x = np.array([-np.inf, np.inf, np.nan, big, -big, 0.0], dt)
    out = np.empty_like(x)
    c.apply_vexp(x, out)
    np.testing.assert_array_equal(out, np.array([0.0, np.inf, np.nan, np.inf, 0.0, 1.0], dt))
    c.apply_vsigmoid(x, out)
    np.testing.assert_array_equal(out, np.array([0.0, 1.0, np.nan, 1.0, 0.0, 0.5], dt))
    c.apply_vtanh(x, out)
    np.testing.assert_array_equal(out, np.array([-1.0, 1.0, np.nan, 1.0, -1.0, 0.0], dt))


# ---------------------------------------------------------------------------------------------
# kernel paths and dtypes

@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_table_and_direct_input_projection_agree(dt, monkeypatch):
    """The (V, 4H) input table (B·T ≥ V), its rows of the tokens read only, and the direct gather-GEMM
    give the same training step."""
    p, prompt, pl, u = problem(dt, V=11)
    ro = nbk.rollout(p, prompt, pl, u, eos_id=EOS)
    assert len(np.unique(ro["tokens"][ro["mask"] > 0])) < 11                  # some rows of the table unread
    reward = np.linspace(-1, 1, len(pl))
    cfg = reinforce.ReinforceConfig(entropy_coef=0.1, eps=0.1)
    res = {}
    monkeypatch.setattr(_config, "NUMBA_TABLE_ROWS_FRACTION", 0.0)      # every row of the table
    for mode, ratio in (("table", 0.0), ("direct", 1e9)):
        monkeypatch.setattr(_config, "NUMBA_TABLE_MIN_POSITIONS", ratio)
        res[mode] = nbk.reinforce_loss_and_grad(p, ro["tokens"], ro["mask"], pl, reward, cfg, ref_logp=ro["logp"] * 0.9)
    monkeypatch.setattr(_config, "NUMBA_TABLE_MIN_POSITIONS", 0.0)
    monkeypatch.setattr(_config, "NUMBA_TABLE_ROWS_FRACTION", 1.0)      # only the rows the batch reads
    res["rows"] = nbk.reinforce_loss_and_grad(p, ro["tokens"], ro["mask"], pl, reward, cfg, ref_logp=ro["logp"] * 0.9)
    tol = 1e-4 if dt == np.float32 else 1e-12
    for other in ("direct", "rows"):
        (o1, g1), (o2, g2) = res["table"], res[other]
        assert abs(o1["loss"] - o2["loss"]) <= tol * max(1.0, abs(o1["loss"])), other
        for k in g1:
            np.testing.assert_allclose(g1[k], g2[k], rtol=tol, atol=tol * np.abs(g1[k]).max(), err_msg=f"{other} {k}")


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_small_matrix_product_every_path(dt):
    """``_lstm_nb.smm`` (register tiles, the last rows and the last columns by plain loops) against
    the float64 product, within the standard bound |C − AB| ≤ K·u·|A||B| (u the unit roundoff); a row
    computed alone gives the same bits as in any batch (every entry is one fma chain over k)."""
    from rlhf_ref._core import _lstm_nb
    rng = np.random.default_rng(3)
    u = np.finfo(dt).eps / 2
    for M, K, N in [(1, 1, 1), (3, 7, 63), (4, 128, 64), (5, 9, 65), (16, 20, 128), (17, 33, 130), (64, 5, 200)]:
        A = rng.standard_normal((M, K)).astype(dt)
        Bt = rng.standard_normal((K, N)).astype(dt)
        C = np.full((M, N), np.nan, dt)
        _lstm_nb.smm(A, Bt, C)
        A64, B64 = A.astype(np.float64), Bt.astype(np.float64)
        bound = K * u * (np.abs(A64) @ np.abs(B64)) * 1.01
        assert np.all(np.abs(C - A64 @ B64) <= bound), (M, K, N)
        for m in (0, M // 2, M - 1):
            c1 = np.full((1, N), np.nan, dt)
            _lstm_nb.smm(A[m:m + 1].copy(), Bt, c1)
            np.testing.assert_array_equal(c1[0], C[m], err_msg=f"row {m} of {(M, K, N)} alone")
    with pytest.raises(ValueError, match="smm"):
        _lstm_nb.smm(np.ones((2, 3), dt), np.ones((4, 5), dt), np.empty((2, 5), dt))
    with pytest.raises(ValueError, match="smm"):
        _lstm_nb.smm(np.ones((2, 3), dt), np.ones((3, 5), dt), np.empty((2, 4), dt))


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_rollout_small_product_and_blas_paths_agree(dt, monkeypatch):
    """The rollout with its per-step products in ``smm`` (blocks of NUMBA_SMM_ROWS rows) and in BLAS:
    the same tokens, log-probs and values up to the rounding of a differently ordered product."""
    p, prompt, pl, u = problem(dt, B=9, T=12, V=7, E=6, H=20)
    pr = lstm.init_params(7, 6, 17, np.random.default_rng(9), heads=("head",), dtype=dt)
    use = nbk._require().lstm.use_smm
    for rows in (4, 5, 9):       # the blocks of 1 or 2 threads: h (rows × H) [W_hhᵀ | heads] (≥ 4H wide)
        assert use(rows, 20, 80, 1, 64) and use(rows, 17, 68, 1, 64) and not use(rows, 20, 80, 0, -1)
    res = {}
    for name, rows in (("smm", (1, 64)), ("blas", (0, -1))):
        monkeypatch.setattr(_config, "NUMBA_SMM_ROWS", rows)
        res[name] = nbk.rollout(p, prompt, pl, u, eps=0.1, eos_id=EOS, ref_params=pr, values=True)
    tol = 1e-4 if dt == np.float32 else 1e-12
    np.testing.assert_array_equal(res["smm"]["tokens"], res["blas"]["tokens"])
    for k in ("logp", "ref_logp", "values"):
        np.testing.assert_allclose(res["smm"][k], res["blas"][k], rtol=tol, atol=tol, err_msg=k)


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_training_small_product_and_blas_paths_agree(dt, monkeypatch):
    """The LSTM forward and BPTT with their per-step products in ``smm`` (H = 64: every product has a
    full tile, the backward one included) and in BLAS: the same loss and gradients up to rounding."""
    p, prompt, pl, u = problem(dt, B=9, T=12, V=7, E=6, H=64)
    use = nbk._require().lstm.use_smm
    for rows in (4, 5, 9):       # forward h (rows × H) W_hhᵀ (H × 4H); backward da (rows × 4H) W_hh (4H × H)
        assert use(rows, 64, 256, 1, 64) and use(rows, 256, 64, 1, 64) and not use(rows, 64, 256, 0, -1)
    ro = nbk.rollout(p, prompt, pl, u, eos_id=EOS)
    reward = np.linspace(-1, 1, len(pl))
    cfg = reinforce.ReinforceConfig(entropy_coef=0.1, eps=0.1)
    res = {}
    for name, rows in (("smm", (1, 64)), ("blas", (0, -1))):
        monkeypatch.setattr(_config, "NUMBA_SMM_ROWS", rows)
        res[name] = nbk.reinforce_loss_and_grad(p, ro["tokens"], ro["mask"], pl, reward, cfg, ref_logp=ro["logp"] * 0.9)
    tol = 1e-4 if dt == np.float32 else 1e-12
    (o1, g1), (o2, g2) = res["smm"], res["blas"]
    assert abs(o1["loss"] - o2["loss"]) <= tol * max(1.0, abs(o1["loss"]))
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=tol, atol=tol * np.abs(g2[k]).max(), err_msg=k)


@needs_numba
def test_float32_is_computed_in_float32():
    """The float32 kernels must not run in float64 (a float64 literal silently promotes in Numba)."""
    p32, prompt, pl, u = problem(np.float32, B=8, T=12, V=11, E=16, H=16)
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    lp32 = nbk.sequence_logprobs(p32, *_teacher(p64, prompt, pl, u))
    lp64 = nbk.sequence_logprobs(p64, *_teacher(p64, prompt, pl, u))
    d = np.abs(lp32.astype(np.float64) - lp64).max()
    assert 1e-9 < d < 1e-4, f"float32 vs float64 log-probs differ by {d:g}: not float32 arithmetic"


def _teacher(p64, prompt, pl, u):
    ro = ref_rollout.rollout(p64, prompt, pl, u, eos_id=EOS)
    return ro["tokens"], ro["mask"], pl


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_rollout_logp_equals_recomputed_logprobs(dt):
    """One code path computes both: the sampling log-probs equal the teacher-forced ones to a few ulps."""
    p, prompt, pl, u = problem(dt, B=6, T=10)
    for eps in (0.0, 0.2):
        ro = nbk.rollout(p, prompt, pl, u, eps=eps, alpha=1.3, eos_id=EOS)
        lp = nbk.sequence_logprobs(p, ro["tokens"], ro["mask"], pl, alpha=1.3, eps=eps)
        np.testing.assert_allclose(ro["logp"], lp, rtol=0, atol=8 * np.finfo(dt).eps * 10)


# ---------------------------------------------------------------------------------------------
# determinism

def _all_outputs(dt):
    p, prompt, pl, u = problem(dt)
    pr = lstm.init_params(7, 6, 5, np.random.default_rng(9), heads=("head",), dtype=dt)
    ro = nbk.rollout(p, prompt, pl, u, eps=0.1, eos_id=EOS, ref_params=pr, values=True)
    o, g = nbk.reinforce_loss_and_grad(p, ro["tokens"], ro["mask"], pl, np.arange(len(pl), dtype=float),
                                       reinforce.ReinforceConfig(whiten="population", entropy_coef=0.05),
                                       ref_params=pr)
    so, sg = nbk.sft_loss_and_grad(p, ro["tokens"], ro["mask"])
    res = {f"ro.{k}": v for k, v in ro.items()}
    res.update({f"rl.{k}": np.asarray(v) for k, v in o.items()})
    res.update({f"rlg.{k}": v for k, v in g.items()})
    res.update({f"sft.{k}": np.asarray(v) for k, v in so.items()})
    res.update({f"sftg.{k}": v for k, v in sg.items()})
    return res


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_repeat_runs_are_bit_identical(dt):
    a, b = _all_outputs(dt), _all_outputs(dt)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


_DIGEST = """
    import hashlib, json, sys, time
    import numpy as np
    sys.path.insert(0, "tests")
    t0 = time.perf_counter()
    from test_numba_backend import _all_outputs
    from rlhf_ref._core import _backend_numba as nbk, _blas, _config
    assert nbk.probe() is None
    out = {}
    for dt in (np.float32, np.float64):
        res = _all_outputs(dt)
        out[np.dtype(dt).name] = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in res.items()}
    from rlhf_ref._core import _lstm_nb, _train_nb
    ks = (_lstm_nb.input_table, _train_nb.policy_stats, _train_nb.policy_grads)
    out["hits"] = sum(sum(k.stats.cache_hits.values()) for k in ks)
    out["misses"] = sum(sum(k.stats.cache_misses.values()) for k in ks)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))
"""


@needs_numba
def test_cold_compile_and_warm_cache_give_identical_bits_and_the_cache_is_used(tmp_path):
    """Process 1 compiles into an empty cache; process 2 loads from it: same bits, cache hits,
    and (say the timings) much faster."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "RLHF_REF_NUMBA_CACHE": "1"}
    cold = json.loads(_run(_DIGEST, env).strip().splitlines()[-1])
    warm = json.loads(_run(_DIGEST, env).strip().splitlines()[-1])
    assert cold["misses"] > 0 and cold["hits"] == 0, cold
    assert warm["hits"] > 0 and warm["misses"] == 0, warm
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path / "cache") for f in fs)
    for dt in ("float32", "float64"):
        assert cold[dt] == warm[dt], f"{dt}: cached code gives different bits from freshly compiled code"
    print(f"\nnumba backend, both dtypes, every kernel: cold compile {cold['seconds']:.1f} s, "
          f"warm cache {warm['seconds']:.1f} s")


@needs_numba
@pytest.mark.parametrize("threads", ["1", "2"])
def test_fixed_thread_count_gives_identical_bits_across_processes(threads):
    """With a fixed thread count (Numba and BLAS), two processes give the same bits: the row
    blocks depend on the thread count only and every reduction has a fixed order."""
    env = {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
    a = json.loads(_run(_DIGEST, env).strip().splitlines()[-1])
    b = json.loads(_run(_DIGEST, env).strip().splitlines()[-1])
    for dt in ("float32", "float64"):
        assert a[dt] == b[dt], f"{dt}, {threads} thread(s): two processes differ"


@needs_numba
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_parallel_row_blocks_match_the_serial_kernels(dt, monkeypatch):
    """Row blocks on Numba's threads (``*_par``) against one block: the same tokens, and values
    equal up to the rounding of a differently blocked BLAS product; repeats bit-identical."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setattr(_config, "NUMBA_PARALLEL", "off")
    serial = _all_outputs(dt)
    monkeypatch.setattr(_config, "NUMBA_PARALLEL", "on")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        assert nbk._blocks(5) == 2
        par, par2 = _all_outputs(dt), _all_outputs(dt)
    finally:
        numba.set_num_threads(old)
    tol = 1e-4 if dt == np.float32 else 1e-12
    for k in serial:
        np.testing.assert_array_equal(par[k], par2[k], err_msg=f"{k}: parallel repeats differ")
        if serial[k].dtype.kind in "iub":
            np.testing.assert_array_equal(par[k], serial[k], err_msg=k)
        else:
            np.testing.assert_allclose(par[k], serial[k], rtol=tol, atol=tol * max(1.0, np.abs(serial[k]).max()),
                                       err_msg=k)


@needs_numba
def test_blas_thread_control_is_found_and_restored():
    """The parallel kernels hold SciPy's OpenBLAS (behind np.dot in Numba) to one thread and give
    the count back; where it cannot be found, "auto" keeps the serial kernels."""
    controls = _blas.controls(lp64=True)
    if not controls:
        assert _config.NUMBA_PARALLEL != "auto" or nbk._blocks(8) == 1
        pytest.skip("no controllable OpenBLAS here")
    before = [get() for get, _ in controls]
    with nbk._one_blas_thread():
        assert all(get() == 1 for get, _ in controls)
    assert [get() for get, _ in controls] == before


@needs_numba
def test_overlapping_holds_from_threads_restore_blas_threads():
    """Issue 10 item 6: two Python threads hold BLAS to one thread (as the parallel kernels do) and
    overlap: A enters, B enters, A leaves, B leaves. OpenBLAS's thread count must come back as
    found; a save/restore per call (B saves A's 1, restores it last) left it at 1."""
    import threading
    controls = _blas.controls(lp64=True)
    if not controls:
        pytest.skip("no controllable OpenBLAS here")
    get, put = controls[0]
    before = [g() for g, _ in controls]
    put(3)                                            # a count other than 1, to see it restored
    steps = [threading.Event() for _ in range(4)]     # A in, B in, A out, B out
    seen = []

    def hold(enter_after, entered, leave_after, left):
        if enter_after is not None:
            enter_after.wait(10)
        with nbk._one_blas_thread():
            seen.append(get())
            entered.set()
            leave_after.wait(10)
        left.set()

    a = threading.Thread(target=hold, args=(None, steps[0], steps[1], steps[2]))
    b = threading.Thread(target=hold, args=(steps[0], steps[1], steps[2], steps[3]))
    try:
        a.start()
        b.start()
        a.join(20)
        b.join(20)
        assert all(e.is_set() for e in steps)
        assert seen == [1, 1]
        assert get() == 3, f"OpenBLAS left at {get()} threads"
    finally:
        for (_, pt), n in zip(controls, before):
            pt(n)


@needs_numba
def test_holds_of_every_blas_and_of_scipys_nest_per_library():
    """The cython backend holds every OpenBLAS, the numba backend SciPy's (LP64) only; the counts
    are kept per library, so a hold of all that ends inside a hold of SciPy's restores NumPy's
    pool and leaves SciPy's at 1 until its own hold ends."""
    every, lp64 = _blas.controls(), _blas.controls(lp64=True)
    if not lp64 or len(every) == len(lp64):
        pytest.skip("needs SciPy's OpenBLAS and another one (NumPy's) here")
    before = [get() for get, _ in every]
    for _, put in every:
        put(2)
    try:
        both, scipy_only = _blas.one_thread(), _blas.one_thread(lp64=True)
        both.__enter__()
        scipy_only.__enter__()
        assert all(get() == 1 for get, _ in every)
        both.__exit__(None, None, None)
        assert all(get() == 1 for get, _ in lp64)
        assert all(get() == 2 for get, put in every if (get, put) not in lp64)
        scipy_only.__exit__(None, None, None)
        assert all(get() == 2 for get, _ in every)
    finally:
        for (_, put), n in zip(every, before):
            put(n)


@needs_numba
def test_cache_disabled_by_environment():
    out = _run("""
        from rlhf_ref._core import _backend_numba as nbk, _blas, _config
        assert nbk.probe() is None
        from rlhf_ref._core import _lstm_nb, _nb_common
        from numba.core.caching import NullCache
        print(_nb_common.CACHE, type(_lstm_nb.forward._cache).__name__)
    """, {"RLHF_REF_NUMBA_CACHE": "0"})
    assert out.split() == ["False", "NullCache"]


@needs_numba
def test_cache_stamp_is_salted_with_every_kernel_file(tmp_path, monkeypatch):
    """Numba stamps a cached function with its own file only; the salt covers every kernel file,
    so editing a helper in another file (the exp in _nb_common, say) invalidates every kernel."""
    from rlhf_ref._core import _lstm_nb, _nb_common, _rollout_nb, _train_nb
    for k in (_lstm_nb.forward, _rollout_nb.rollout, _train_nb.policy_grads):
        if _nb_common.CACHE and k.__name__ not in _nb_common.CACHE_STATE["uncached"]:
            assert k._cache._cache_file._source_stamp[1] == _nb_common.SALT
    for f in _nb_common._kernel_files():
        (tmp_path / f).write_bytes(open(os.path.join(_nb_common.HERE, f), "rb").read())
    monkeypatch.setattr(_nb_common, "HERE", str(tmp_path))
    assert _nb_common._salt() == _nb_common.SALT
    with open(tmp_path / "_nb_common.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert _nb_common._salt() != _nb_common.SALT
    assert set(_nb_common._kernel_files()) >= {"_nb_common.py", "_lstm_nb.py", "_policy_nb.py", "_rollout_nb.py",
                                                "_train_nb.py", "_returns_nb.py", "_model_nb.py"}
