"""The golden cases: one row per configuration of the objective (data, not code).

``CASES`` lists every case by name, with its description, the convention switches that differ from
``ReinforceConfig``'s defaults, its dtype, its edge-case input recipe and its sections. The inputs
and outputs of a case are computed from this row by ``rlhf_ref.golden.vectors``;
``case_table_markdown()`` renders the table of docs/golden-vectors.md §5 (a test checks the doc).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .. import reinforce
from .. import returns as ret
from ..tokenizer import EOS

SCHEMA = "rlhf_ref.golden_vectors"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GATE_ORDER = ("i", "f", "g", "o")

V, E, H = 7, 3, 4          #: vocabulary (PAD, BOS, EOS, UNK and 3 characters), embedding, hidden
B, T = 4, 8                #: episodes and positions of the rollout and of most rl batches
P = 3                      #: preference pairs of the rm section
U_MARGIN = 1e-3            #: every used uniform lies at least this far from every CDF boundary

# ------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class CaseSpec:
    """One golden case: a configuration (changes from ReinforceConfig's defaults) and an input recipe."""
    name: str
    description: str
    config: dict = field(default_factory=dict)      #: ReinforceConfig fields that differ from the defaults
    dtype: str = "float64"
    edge: str = ""                                  #: "", single_token, padding_rows, small_variance
    sections: tuple = ("rollout", "rl")


def _c(name, description, dtype="float64", edge="", sections=("rollout", "rl"), **config):
    return CaseSpec(name, description, dict(config), dtype, edge, tuple(sections))


ALL_SECTIONS = ("rollout", "rl", "sft", "rm")
ALL_ON = dict(alpha=1.5, eps=0.05, gamma=0.95, beta=0.1, kl="k3", whiten="bessel", aggregation="seq_sum",
              entropy_coef=0.01, value_coef=0.25)

CASES = (
    # the defaults of DESIGN.md §3, in both dtypes, with every section
    _c("base", "DESIGN.md defaults (alpha 1, eps 0, gamma 1, beta 0.05, k1, reward-to-go, value baseline, "
       "no whitening, token mean, c_H 0, c_V 0.5)", sections=ALL_SECTIONS),
    _c("base_f32", "the defaults in float32", dtype="float32", sections=ALL_SECTIONS),
    # one switch at a time
    _c("alpha_2", "inverse temperature alpha = 2 (temperature 0.5) for sampling AND scoring, policy and reference",
       alpha=2.0),
    _c("alpha_0_5", "inverse temperature alpha = 0.5 (temperature 2)", alpha=0.5),
    _c("eps_0_1", "trainable epsilon-mixture, eps = 0.1 (sampling, scoring, entropy, reference)", eps=0.1),
    _c("gamma_0_9", "discount gamma = 0.9 with reward-to-go", gamma=0.9),
    _c("beta_0", "no KL penalty (beta = 0)", beta=0.0),
    _c("beta_0_5", "a large KL penalty (beta = 0.5)", beta=0.5),
    _c("kl_k2", "KL estimator k2 = x^2/2 in the reward", kl="k2"),
    _c("kl_k3", "KL estimator k3 = expm1(-x) + x in the reward (ratio pi_ref/pi)", kl="k3"),
    _c("returns_total", "returns 'total': sum_j gamma^j r_j written at every action", returns="total"),
    _c("baseline_none", "no baseline (the value head is still trained)", baseline="none"),
    _c("baseline_mean", "batch-mean baseline (the row itself included)", baseline="mean"),
    _c("baseline_loo", "leave-one-out baseline (the other rows' actions)", baseline="loo"),
    _c("baseline_qvalue", "action-value critic: baseline sum_a pi(a|s) Q(s, a), L_value on Q(s, a_t)",
       baseline="qvalue"),
    _c("whiten_population", "advantage whitening, population variance", whiten="population"),
    _c("whiten_bessel", "advantage whitening, Bessel-corrected variance", whiten="bessel"),
    _c("whiten_no_shift", "population whitening with shift_mean = False (the mean is added back)",
       whiten="population", shift_mean=False),
    _c("agg_seq_mean", "aggregation seq_mean (each row's token mean, averaged over rows)", aggregation="seq_mean"),
    _c("agg_seq_sum", "aggregation seq_sum (sum over actions / rows with an action)", aggregation="seq_sum"),
    _c("entropy_coef", "entropy bonus c_H = 0.05", entropy_coef=0.05),
    _c("value_coef_1", "value coefficient c_V = 1", value_coef=1.0),
    # interactions that change numbers
    _c("total_gamma_0_9", "total returns with gamma = 0.9 (gamma^j counted from each row's first action)",
       returns="total", gamma=0.9),
    _c("qvalue_eps", "action-value baseline under the eps-mixture (the expectation uses pi_eps)",
       baseline="qvalue", eps=0.1, alpha=1.5),
    _c("whiten_none_baseline", "population whitening of raw returns (baseline none)", whiten="population",
       baseline="none"),
    _c("whiten_bessel_loo", "Bessel whitening after the leave-one-out baseline", whiten="bessel", baseline="loo"),
    _c("seq_mean_gamma_k3", "seq_mean aggregation, gamma = 0.9, k3", aggregation="seq_mean", gamma=0.9, kl="k3"),
    _c("all_on", "every switch away from its default at once", **ALL_ON),
    _c("all_on_f32", "every switch away from its default at once, float32", dtype="float32", **ALL_ON),
    _c("qvalue_f32", "action-value critic in float32", dtype="float32", baseline="qvalue", entropy_coef=0.05),
    # edge cases
    _c("single_token", "every row has exactly one action (the prompt fills all but the last position)",
       edge="single_token", entropy_coef=0.05),
    _c("padding_rows", "an all-padding row, a prompt-only row (no action), two extra padding columns and "
       "arbitrary ids at padding positions: none of them may change any result", edge="padding_rows",
       sections=ALL_SECTIONS, entropy_coef=0.05),
    _c("padding_rows_seq_mean_loo", "padding rows with seq_mean, leave-one-out and Bessel whitening "
       "(rows without an action are not counted)", edge="padding_rows", aggregation="seq_mean", baseline="loo",
       whiten="bessel"),
    _c("peaked", "very peaked policy: alpha = 20", alpha=20.0, entropy_coef=0.05),
    _c("peaked_f32", "very peaked policy, alpha = 20, float32", dtype="float32", alpha=20.0, entropy_coef=0.05),
    _c("whiten_small_variance", "population whitening of advantages whose variance (~1e-8) is comparable to the "
       "1e-8 inside the square root: where the eps goes shows", edge="small_variance", beta=0.0,
       baseline="none", whiten="population"),
)


def case_names():
    return [c.name for c in CASES]


def get_spec(name):
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no golden case named {name!r}; cases: {', '.join(case_names())}")


def config_of(spec):
    """The full configuration of a case by convention name (every field, defaults included)."""
    cfg = reinforce.ReinforceConfig(**spec.config)
    d = cfg.to_dict()
    d.update({"whiten_eps": ret.WHITEN_EPS, "critic": cfg.critic, "policy_kind": "boltzmann",
              "eos_id": EOS, "layout": "token-aligned", "dtype": spec.dtype})
    return d


def _seed(name):
    """A seed from the case name, so that adding a case leaves the others unchanged."""
    return int.from_bytes(hashlib.sha256(("rlhf_ref golden " + name).encode()).digest()[:8], "little")



def _value_text(v):
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def case_table_markdown():
    """The case table of docs/golden-vectors.md §5, rendered from ``CASES`` (one row per case);
    tests/test_vectors.py checks that the doc holds exactly this text between its markers."""
    lines = ["| case | dtype | switches | edge | sections | what it tests |",
             "|---|---|---|---|---|---|"]
    for c in CASES:
        sw = ", ".join(f"{k}={_value_text(v)}" for k, v in c.config.items()) or "(defaults)"
        lines.append(f"| `{c.name}` | {c.dtype} | {sw} | {c.edge} | {' '.join(c.sections)} | {c.description} |")
    return "\n".join(lines) + "\n"
