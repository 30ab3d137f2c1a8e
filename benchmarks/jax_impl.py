"""JAX CPU peer for the benchmark: the same model, sampling rule and loss, written as a speed-minded
JAX user would write it (issue 12).

- ``jax.jit`` over ``jax.lax.scan`` (one compiled loop, no Python per step);
- the input projection tabulated once per call: ``xtab = E·W_ihᵀ + b_ih + b_hh`` (V × 4H), so a
  step gathers one row per sequence instead of a (B × E)·(E × 4H) product;
- inverse-CDF sampling from the same pre-drawn uniforms inside the scan (rlhf_ref's rule,
  docs/conventions.md §4), so the tokens can be checked against the NumPy reference;
- the training step is ``jax.value_and_grad`` of the default REINFORCE objective (docs/conventions.md §3:
  k1 KL penalty β = 0.05, γ = 1, reward-to-go, value baseline, token mean, c_V = 0.5; the same
  objective as ``torch_impl.reinforce_step``) for full-length rows with prompt = BOS;
- parameters and inputs live on the device (``jax.device_put``) before timing, and every timed
  call ends with ``block_until_ready``.

JAX is an optional dependency (the ``bench`` extra). Thread count: XLA reads ``XLA_FLAGS`` when it
starts; ``benchmarks/run.py`` sets them for a 1-thread run (``run.XLA_ONE_THREAD``) and pins the
process to one CPU, because XLA's CPU client still computes on its own worker threads.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_ref.tokenizer import BOS      # the prompt is BOS alone, as in harness.make_case


def to_device(params):
    """float32 parameter dict (rlhf_ref names) -> dict of device arrays."""
    return {k: jax.device_put(np.asarray(v, np.float32)) for k, v in params.items()}


def _input_table(p):
    # (V, 4H): the input projection of every token, plus both biases (tabulated once per call)
    return p["embedding.weight"] @ p["lstm.weight_ih_l0"].T + (p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"])


def _cell(xg, h, c, whh_t):
    g = xg + h @ whh_t                                           # (B, 4H), gates i, f, g, o
    i, f, gg, o = jnp.split(g, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


@functools.partial(jax.jit, static_argnames="unroll")
def rollout(p, u, unroll=1):
    """prompt = BOS, then T−1 tokens sampled by inverse CDF with u[:, t]. Returns (tokens (B, T),
    logp (B, T−1)). The benchmark cases put EOS at −30 so no row ends early (fixed work), as for
    the PyTorch peer; a row is never cut here. ``unroll``: steps per loop iteration of the scan."""
    B, T = u.shape
    H = p["lstm.weight_hh_l0"].shape[1]
    V = p["head.weight"].shape[0]
    xtab = _input_table(p)
    whh_t = p["lstm.weight_hh_l0"].T
    wout_t, bout = p["head.weight"].T, p["head.bias"]

    def step(carry, u_t):
        tok, h, c = carry
        h, c = _cell(xtab[tok], h, c, whh_t)
        logq = jax.nn.log_softmax(h @ wout_t + bout, axis=-1)
        cdf = jnp.cumsum(jnp.exp(logq), axis=-1)
        a = jnp.minimum(jnp.sum(cdf <= u_t[:, None], axis=-1), V - 1)
        lp = jnp.take_along_axis(logq, a[:, None], axis=-1)[:, 0]
        return (a, h, c), (a, lp)

    init = (jnp.full((B,), BOS, jnp.int32), jnp.zeros((B, H), u.dtype), jnp.zeros((B, H), u.dtype))
    _, (toks, lps) = jax.lax.scan(step, init, u[:, 1:].T, unroll=unroll)
    return jnp.concatenate([init[0][:, None], toks.T], axis=1), lps.T


def _loss(p, tokens, ref_logp, reward, unroll=1, beta=0.05, value_coef=0.5):
    B, T = tokens.shape
    H = p["lstm.weight_hh_l0"].shape[1]
    xg = _input_table(p)[tokens[:, :-1].T]                      # (T−1, B, 4H): gathered, not multiplied
    whh_t = p["lstm.weight_hh_l0"].T

    def step(carry, xg_t):
        h, c = _cell(xg_t, *carry, whh_t)
        return (h, c), h

    z0 = jnp.zeros((B, H), xg.dtype)
    _, hs = jax.lax.scan(step, (z0, z0), xg, unroll=unroll)                   # h_0 .. h_{T−2}, (T−1, B, H)
    logq = jax.nn.log_softmax(hs @ p["head.weight"].T + p["head.bias"], axis=-1)
    logp = jnp.take_along_axis(logq, tokens[:, 1:].T[:, :, None], axis=-1)[:, :, 0]   # (T−1, B)
    values = (hs @ p["value.weight"].T + p["value.bias"])[:, :, 0]
    r = -beta * (jax.lax.stop_gradient(logp) - ref_logp[:, 1:].T)
    r = r.at[-1].add(reward)
    G = jnp.cumsum(r[::-1], axis=0)[::-1]                      # reward-to-go, γ = 1
    adv = jax.lax.stop_gradient(G - values)
    N = B * (T - 1)
    return -(adv * logp).sum() / N + value_coef * 0.5 * ((values - G) ** 2).sum() / N


train_step = jax.jit(jax.value_and_grad(_loss), static_argnames="unroll")
"""(p, tokens (B, T) int32, ref_logp (B, T), reward (B,), unroll=1) -> (loss, grads with the keys of p)."""

# The variants timed (the faster is "best JAX"): the plain scan, and the scan unrolled 4 steps per
# loop iteration (what a user tuning a short recurrent loop on CPU tries first; 4 was the best of
# 1, 4, 8, 16 at B = 1 and 16 in a trial on the development machine, 8 and 16 slowed training).
VARIANTS = {"jax_scan": 1, "jax_unroll4": 4}


def compile_seconds(fn, *args, **kw):
    """Wall time of the first call (trace + XLA compile + one run) and of the second (run only)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args, **kw))
    t1 = time.perf_counter()
    jax.block_until_ready(fn(*args, **kw))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1
