"""The optimisers: SGD and Adam against torch.optim (float64, several steps), Adam against its
formula written out here (Kingma & Ba 2015, Algorithm 1), and global-norm clipping against
torch.nn.utils.clip_grad_norm_ and its definition.

Each step is a handful of elementwise operations, so the tolerance is kernel_tol(float64, n) with n
a few ops per step times the number of steps (errors add up across steps); clipping reduces over
every parameter entry (n = their count).
"""

import numpy as np
import pytest

from _tol import assert_close
from rlhf_ref import lstm, optim

STEPS = 6
OPS_PER_STEP = 8                     # Adam: two moment updates, two bias corrections, sqrt, add, divide, update


def problem(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(5, 3, 4, rng)
    grads = [{k: rng.normal(0, scale, v.shape) for k, v in p.items()} for _ in range(STEPS)]
    return p, grads


def copy(d):
    return {k: v.copy() for k, v in d.items()}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _torch_run(torch, p, grads, make_opt):
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    opt = make_opt(list(tp.values()))
    for g in grads:
        for k, t in tp.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


@pytest.mark.torch
@pytest.mark.parametrize("lr", [0.1, 0.0, 1.7])
def test_sgd_matches_torch(torch, lr):
    p, grads = problem(1)
    ours = copy(p)
    for g in grads:
        out = optim.sgd_step(ours, g, lr)
        assert out is ours                                      # in place, and returned
    theirs = _torch_run(torch, p, grads, lambda ps: torch.optim.SGD(ps, lr=lr))
    for k in p:
        assert_close(ours[k], theirs[k], n=2 * STEPS, scale=max(1.0, np.max(np.abs(p[k]))), name=k)
    if lr > 0:                                                  # not vacuous: the parameters moved
        assert max(np.max(np.abs(ours[k] - p[k])) for k in p) > 0.1


@pytest.mark.torch
@pytest.mark.parametrize("lr,betas,eps", [(1e-3, (0.9, 0.999), 1e-8), (0.05, (0.5, 0.9), 1e-6), (0.2, (0.0, 0.0), 1e-3)])
def test_adam_matches_torch(torch, lr, betas, eps):
    p, grads = problem(2, scale=3.0)
    ours = copy(p)
    state = optim.adam_init(ours)
    for g in grads:
        optim.adam_step(ours, g, state, lr=lr, betas=betas, eps=eps)
    assert state["t"] == STEPS
    theirs = _torch_run(torch, p, grads, lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps))
    for k in p:
        assert_close(ours[k], theirs[k], n=OPS_PER_STEP * STEPS, scale=max(1.0, np.max(np.abs(p[k]))), name=k)


def test_adam_matches_its_formula():
    """m_t = β1 m + (1−β1) g;  v_t = β2 v + (1−β2) g²;  θ −= lr·(m_t/(1−β1ᵗ)) / (√(v_t/(1−β2ᵗ)) + ε)."""
    p, grads = problem(3, scale=2.0)
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-7
    ours = copy(p)
    state = optim.adam_init(ours)
    want = copy(p)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        optim.adam_step(ours, g, state, lr=lr, betas=(b1, b2), eps=eps)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            want[k] = want[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
        for k in p:
            assert_close(state["m"][k], m[k], n=2 * t, scale=2.0, name=f"m {k} step {t}")
            assert_close(state["v"][k], v[k], n=2 * t, scale=4.0, name=f"v {k} step {t}")
            assert_close(ours[k], want[k], n=OPS_PER_STEP * t, scale=max(1.0, np.max(np.abs(p[k]))), name=f"{k} step {t}")
    # the first step moves every entry by lr·sign(g) (m̂ = g, v̂ = g²), up to ε: a known closed form
    first = copy(p)
    optim.adam_step(first, grads[0], optim.adam_init(first), lr=lr, betas=(b1, b2), eps=eps)
    g0 = grads[0]
    for k in p:
        assert_close(first[k], p[k] - lr * g0[k] / (np.abs(g0[k]) + eps), n=OPS_PER_STEP, name=f"first step {k}")


def test_adam_works_in_float32():
    p, grads = problem(4)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    state = optim.adam_init(p32)
    ref = copy(p)
    sref = optim.adam_init(ref)
    for g in grads:
        optim.adam_step(p32, g, state, lr=0.01)
        optim.adam_step(ref, g, sref, lr=0.01)
    for k in p:
        assert p32[k].dtype == np.float32
        assert_close(p32[k], ref[k], np.float32, n=OPS_PER_STEP * STEPS, scale=max(1.0, np.max(np.abs(p[k]))), name=k)


@pytest.mark.torch
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_grad_norm_matches_torch(torch, max_norm):
    _, grads = problem(5)
    g = grads[0]
    n_entries = sum(v.size for v in g.values())
    clipped, norm = optim.clip_grad_norm(g, max_norm)
    want_norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    assert_close(norm, want_norm, n=n_entries, name="norm")
    tg = [torch.tensor(g[k], requires_grad=False) for k in sorted(g)]
    ts = [torch.zeros_like(t, requires_grad=True) for t in tg]
    for s, t in zip(ts, tg):
        s.grad = t.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    assert_close(norm, float(tnorm), n=n_entries, name="torch norm")
    for k, s in zip(sorted(g), ts):
        assert_close(clipped[k], s.grad.numpy(), n=n_entries, name=k)
    # the definition: g·min(1, max_norm/(‖g‖ + 1e-6)); the input is not modified
    scale = min(1.0, max_norm / (want_norm + 1e-6))
    for k in g:
        assert_close(clipped[k], g[k] * scale, n=n_entries, name=f"definition {k}")
        assert clipped[k] is not g[k]
    new_norm = np.sqrt(sum(np.sum(v ** 2) for v in clipped.values()))
    assert new_norm <= max_norm * (1 + 1e-12) and (max_norm < want_norm or new_norm == want_norm)
