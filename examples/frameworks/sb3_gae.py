"""Stable-Baselines3's GAE (the real ``RolloutBuffer.compute_returns_and_advantage``) against the
golden vectors.

    python examples/frameworks/sb3_gae.py [--golden DIR] [--case NAME ...]

Needs ``pip install "rlhf-ref[frameworks]"`` (stable-baselines3==2.9.2). For every golden case with
the value baseline and reward-to-go (or GAE) returns, the case's per-token ``rewards`` and
``values`` are put into an SB3 RolloutBuffer, SB3 computes the returns and advantages, and
``rlhf_ref.testing.assert_matches_golden`` compares them with the golden ``returns`` and
``advantages`` (the advantages only when the case does not whiten: SB3's PPO whitens per
minibatch inside ``train()``, not in the buffer).

The mapping (SB3 is an environment library: its buffer is time-major, one column per env):

    SB3                          rlhf_ref golden case (token-aligned (B, T))
    buffer_size, n_envs          T, B: step t of env b is token position t of row b
    rewards[t, b]                rewards[b, t] (−β·k_t, + R at the last action; 0 off the action mask)
    values[t, b]                 values[b, t] on the action mask, 0 elsewhere
    episode_starts[t, b] = 1     at t = prompt_len[b] (the first action) and at t = last action + 1:
                                 SB3 cuts the bootstrap before a step whose episode_starts is 1
                                 (next_non_terminal = 1 − episode_starts[t + 1]), which is our
                                 "V_next = 0 after the row's last action"
    dones = 1, last_values = 0   no bootstrap past the last column (our rows end inside the array)
    gamma, gae_lambda            the case's gamma; lam for returns="gae", 1 for "rtg" (GAE(λ = 1) is
                                 the discounted reward-to-go minus V)
    returns, advantages [t, b]   returns[b, t], advantages[b, t] (before whitening), read on the
                                 action mask (SB3 also writes harmless 0s at the prompt/padding steps)

SB3 allocates its arrays as float32. For a float32 case they stay float32 (SB3 as users run it);
for a float64 case the buffer's arrays are replaced by float64 arrays of the same shape before
the call, so that SB3's own arithmetic is compared at float64 tolerance (the function is
dtype-agnostic NumPy; nothing of it is copied here).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from rlhf_ref import testing


def applicable(config):
    """Cases whose returns/advantages SB3's GAE computes: value baseline, rtg or gae returns."""
    return config.get("baseline") == "value" and config.get("returns") in ("rtg", "gae")


def sb3_outputs(case):
    """SB3's returns and advantages for a golden case, mapped back to the token-aligned (B, T)."""
    import gymnasium as gym
    import torch
    from stable_baselines3.common.buffers import RolloutBuffer

    cfg = case.config
    am = case.expected["action_mask"] > 0
    B, T = am.shape
    dt = np.dtype(cfg["dtype"])
    lam = float(cfg.get("lam", 1.0)) if cfg["returns"] == "gae" else 1.0
    buf = RolloutBuffer(T, gym.spaces.Box(-1.0, 1.0, (1,)), gym.spaces.Discrete(2), device="cpu",
                        gae_lambda=lam, gamma=float(cfg["gamma"]), n_envs=B)
    for name in ("rewards", "values", "episode_starts", "advantages", "returns"):
        setattr(buf, name, np.zeros((T, B), dtype=dt))
    buf.rewards[:] = np.where(am, case.expected["rewards"], 0.0).T
    buf.values[:] = np.where(am, case.expected["values"], 0.0).T
    for b in range(B):
        ts = np.flatnonzero(am[b])
        if ts.size == 0:
            continue
        buf.episode_starts[ts[0], b] = 1.0
        if ts[-1] + 1 < T:
            buf.episode_starts[ts[-1] + 1, b] = 1.0
    buf.compute_returns_and_advantage(last_values=torch.zeros(B, dtype=torch.float64),
                                      dones=np.ones(B, dtype=bool))
    out = {"returns": np.where(am, buf.returns.T, 0.0).astype(dt)}
    if cfg["whiten"] == "off":
        out["advantages"] = np.where(am, buf.advantages.T, 0.0).astype(dt)
    return out


def check(name, golden=None):
    """Assert that SB3's GAE reproduces case ``name``; returns the verifier's report."""
    case = testing.load_case(name, golden)
    if not applicable(case.config):
        raise ValueError(f"case {name!r}: SB3's GAE needs baseline='value' and returns 'rtg' or 'gae'")
    outs = sb3_outputs(case)
    return testing.assert_matches_golden(outs, name, golden, require=tuple(outs))


def applicable_cases(golden=None):
    return testing.case_names(golden, lambda config, inputs: applicable(config))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", help="golden folder (rlhf-ref vectors --out DIR); default: generated")
    p.add_argument("--case", action="append", help="only these cases (default: every applicable one)")
    a = p.parse_args(argv)
    names = a.case or applicable_cases(a.golden)
    for n in names:
        rep = check(n, a.golden)
        print(rep.format())
    print(f"stable-baselines3 GAE matches {len(names)} golden cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
