"""The table of conventions: every switch of the RL objective and of the policy, declared once.

Each row says the switch's name, its allowed values (or its range), its default, what it means in
one line, and which quantity of ``reinforce.loss_and_grad``'s ``out`` it changes first
(docs/conventions.md §3 has the equations). Everything else is derived from this table:

    ReinforceConfig           its fields' defaults and its validation (reinforce.py)
    pipeline/rl.py RLConfig   inherits ReinforceConfig, so ``--set`` reaches every switch
    the compiled kernels      integer codes: a choice's code is its index in ``values``
                              (``code``; _core/_host.py passes them, the kernels hold no names)
    the tests                 the equivalence suite and the bad-input suite draw from ``SWITCHES``

Adding a value (a KL estimator "k4", say): append it to its row here, add its branch to the
reference (returns.kl_estimate) and to each kernel; the equivalence suite then draws it on every
backend, and a kernel without the branch fails there.

This module imports nothing from the package: the reference imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """One convention. ``values`` for a choice (a str, or a bool), else the range [lo, hi]."""
    name: str
    default: object
    meaning: str
    changes: str                    #: the first quantity of ``out`` it changes
    values: tuple | None = None     #: the allowed choices, in kernel-code order; None: a real number
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    @property
    def is_choice(self):
        return self.values is not None and not self.is_bool

    @property
    def is_bool(self):
        return self.values == (True, False)

    @property
    def type(self):
        """The Python type of a value (what ``--set name=...`` parses)."""
        return bool if self.is_bool else (str if self.is_choice else float)

    def code(self, value):
        """The integer a kernel receives for ``value``: its index in ``values``."""
        return self.values.index(value)


#: the switches of the REINFORCE objective, in ``ReinforceConfig``'s field order
SWITCHES = (
    Switch("alpha", 1.0, "inverse temperature α > 0 of the Boltzmann policy", "logp", lo=0.0, lo_open=True),
    Switch("eps", 0.0, "ε ∈ [0, 1] of the trainable ε-mixture", "logp", lo=0.0, hi=1.0),
    Switch("gamma", 1.0, "discount γ ∈ [0, 1]", "returns", lo=0.0, hi=1.0),
    Switch("beta", 0.05, "KL coefficient β ≥ 0", "rewards", lo=0.0),
    Switch("kl", "k1", "KL estimator in the reward: k1 = x, k2 = x²/2, k3 = expm1(−x) + x", "kl",
           values=("k1", "k2", "k3")),
    Switch("returns", "rtg", "rtg (reward-to-go), total (the article's Σγᵗ r_t at every action) or gae "
           "(G = A^GAE(γ, λ) + V; needs baseline='value')", "returns",
           values=("rtg", "total", "gae")),
    Switch("baseline", "value", "value V(s), qvalue Σπ·Q, mean, loo (leave-one-out), none, group_mean "
           "(mean sequence return of the row's group) or group_loo (RLOO: the group's other rows)", "baseline",
           values=("value", "qvalue", "mean", "loo", "none", "group_mean", "group_loo")),
    Switch("whiten", "off", "advantage whitening: off, population σ², bessel σ² (N − 1)", "advantages",
           values=("off", "population", "bessel")),
    Switch("shift_mean", True, "whitening subtracts the mean (False adds it back)", "advantages",
           values=(True, False)),
    Switch("aggregation", "token_mean", "loss weights: token_mean, seq_mean, seq_sum, fixed_len (m / (B·L))",
           "weights", values=("token_mean", "seq_mean", "seq_sum", "fixed_len")),
    Switch("entropy_coef", 0.0, "entropy bonus coefficient c_H ≥ 0", "loss_ent", lo=0.0),
    Switch("value_coef", 0.5, "value-loss coefficient c_V ≥ 0", "loss_value", lo=0.0),
    # issue 9: the field's conventions (TRL, OpenRLHF, verl: GRPO, RLOO, Dr. GRPO, PPO, DAPO)
    Switch("kl_in", "reward", "where β·k goes: reward (−β·k_t in r_t) or loss (+β·Σ w·k, GRPO)", "rewards",
           values=("reward", "loss")),
    Switch("lam", 1.0, "GAE λ ∈ [0, 1] (returns='gae' only)", "returns", lo=0.0, hi=1.0),
    Switch("group_scale", "off", "group baselines' scaling: off or std ((G − b)/(σ_g + group_eps), GRPO)",
           "advantages", values=("off", "std")),
    Switch("group_eps", 1e-4, "ε ≥ 0 of group_scale='std'", "advantages", lo=0.0),
    Switch("surrogate", "reinforce", "policy loss: reinforce (−A·log π) or ppo_clip (−min(ρA, clip(ρ)A))",
           "loss_pg", values=("reinforce", "ppo_clip")),
    Switch("clip_low", 0.2, "PPO ratio clip below: ρ ≥ 1 − clip_low", "loss_pg", lo=0.0),
    Switch("clip_high", 0.2, "PPO ratio clip above: ρ ≤ 1 + clip_high (DAPO: larger)", "loss_pg", lo=0.0),
    Switch("value_clip", 0.0, "value-loss clip c ≥ 0 around old_values (0: off)", "loss_value", lo=0.0),
    Switch("norm_len", 0.0, "L of aggregation='fixed_len' (0: the array width T)", "weights", lo=0.0),
)

#: the policy that samples (rollout) and scores (``policy="..."``); not a ReinforceConfig field
POLICY = Switch("policy", "boltzmann", "boltzmann (trainable), eps_greedy or greedy (decoding only)", "tokens",
                values=("boltzmann", "eps_greedy", "greedy"))

TABLE = {s.name: s for s in SWITCHES + (POLICY,)}


def values(name):
    """The allowed values of the choice ``name`` (a tuple, in code order)."""
    return TABLE[name].values


def default(name):
    return TABLE[name].default


def code(name, value):
    """The integer code of ``value`` for the choice ``name`` (what the kernels receive)."""
    return TABLE[name].code(value)
