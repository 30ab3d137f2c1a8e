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
    Switch("returns", "rtg", "rtg (reward-to-go) or total (the article's Σγᵗ r_t at every action)", "returns",
           values=("rtg", "total")),
    Switch("baseline", "value", "value V(s), qvalue Σπ·Q, mean, loo (leave-one-out) or none", "baseline",
           values=("value", "qvalue", "mean", "loo", "none")),
    Switch("whiten", "off", "advantage whitening: off, population σ², bessel σ² (N − 1)", "advantages",
           values=("off", "population", "bessel")),
    Switch("shift_mean", True, "whitening subtracts the mean (False adds it back)", "advantages",
           values=(True, False)),
    Switch("aggregation", "token_mean", "loss weights: token_mean, seq_mean, seq_sum", "weights",
           values=("token_mean", "seq_mean", "seq_sum")),
    Switch("entropy_coef", 0.0, "entropy bonus coefficient c_H ≥ 0", "loss_ent", lo=0.0),
    Switch("value_coef", 0.5, "value-loss coefficient c_V ≥ 0", "loss_value", lo=0.0),
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
