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
SCHEMA_VERSION = 2          #: 2: the issue-9 switches in every config; inputs group, old_logp, old_values; ratio, loss_kl
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
    edge: str = ""          #: "", single_token, padding_rows, small_variance, off_policy, ratio_one
    sections: tuple = ("rollout", "rl")
    policy_kind: str = "boltzmann"                  #: the rollout's decoding policy (the rl section: Boltzmann)


def _c(name, description, dtype="float64", edge="", sections=("rollout", "rl"), policy_kind="boltzmann", **config):
    return CaseSpec(name, description, dict(config), dtype, edge, tuple(sections), policy_kind)


ALL_SECTIONS = ("rollout", "rl", "sft", "rm")
ALL_ON = dict(alpha=1.5, eps=0.05, gamma=0.95, beta=0.1, kl="k3", whiten="bessel", aggregation="seq_sum",
              entropy_coef=0.01, value_coef=0.25)
#: the field's defaults (docs/frameworks.md); frameworks without a critic: value_coef 0
TRL_GRPO = dict(returns="total", baseline="group_mean", group_scale="std", beta=0.0, kl="k3", kl_in="loss",
                surrogate="ppo_clip", aggregation="token_mean", value_coef=0.0)

CASES = (
    # the defaults of docs/conventions.md §3, in both dtypes, with every section
    _c("base", "the defaults of docs/conventions.md (alpha 1, eps 0, gamma 1, beta 0.05, k1, reward-to-go, value baseline, "
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
    # issue 9: one switch value at a time (inputs group / old_logp / old_values where used)
    _c("kl_in_loss_k1", "KL in the loss (k1): rewards carry R only, loss_kl = beta sum w k1, d/dlogp = beta w",
       kl_in="loss", beta=0.2),
    _c("kl_in_loss_k2", "KL in the loss (k2): d loss_kl/dlogp = beta w x", kl_in="loss", kl="k2", beta=0.2),
    _c("kl_in_loss_k3", "KL in the loss (k3, GRPO's): d loss_kl/dlogp = beta w (1 - exp(-x))", kl_in="loss",
       kl="k3", beta=0.2),
    _c("gae_lam_0_95", "GAE, lam = 0.95, gamma = 0.99: returns = A^GAE + V (V_next = 0 after the last action)",
       returns="gae", lam=0.95, gamma=0.99),
    _c("gae_lam_1", "GAE with lam = 1: returns equal reward-to-go exactly", returns="gae", lam=1.0),
    _c("gae_lam_0", "GAE with lam = 0: one-step TD advantages r_t + gamma V_next - V_t", returns="gae", lam=0.0,
       gamma=0.9),
    _c("group_mean", "group-mean baseline: b_i = mean over the row's group (ids in 'group') of S_j = G at the "
       "first action, the row included", baseline="group_mean"),
    _c("group_loo", "group leave-one-out (RLOO) baseline: the mean of S over the OTHER rows of the group",
       baseline="group_loo"),
    _c("group_std", "group-mean baseline and GRPO scaling (G - b)/(sigma_g + 1e-4), sigma_g the Bessel std of "
       "S over the group", baseline="group_mean", group_scale="std"),
    _c("group_std_eps", "GRPO scaling with a large group_eps = 0.5 (where the eps goes shows)",
       baseline="group_loo", group_scale="std", group_eps=0.5),
    _c("ppo_clip", "PPO-clip surrogate with a perturbed old_logp (ratio != 1, clipping active on both sides)",
       edge="off_policy", surrogate="ppo_clip"),
    _c("ppo_clip_ratio_one", "PPO-clip with old_logp = logp (ratio 1): the gradient is REINFORCE's, the loss "
       "-sum w A", edge="ratio_one", surrogate="ppo_clip"),
    _c("dapo_clip_higher", "PPO-clip with clip_low 0.2, clip_high 0.28 (DAPO's clip-higher), perturbed old_logp",
       edge="off_policy", surrogate="ppo_clip", clip_high=0.28),
    _c("value_clip", "clipped value loss, value_clip 0.2 around a perturbed old_values", edge="off_policy",
       value_clip=0.2),
    _c("agg_fixed_len", "aggregation fixed_len with norm_len 0: w = m / (B T), T the array width",
       aggregation="fixed_len"),
    _c("agg_fixed_len_norm", "aggregation fixed_len with norm_len 16: w = m / (B 16) (Dr. GRPO's max length)",
       aggregation="fixed_len", norm_len=16.0),
    # issue 9: the interactions that matter
    _c("grpo", "GRPO: group_mean + std scaling, k3 in the loss (beta 0.04), token_mean, ppo_clip off-policy",
       edge="off_policy", **{**TRL_GRPO, "beta": 0.04}),
    _c("grpo_f32", "GRPO (as 'grpo') in float32", dtype="float32", edge="off_policy",
       **{**TRL_GRPO, "beta": 0.04}),
    _c("rloo", "RLOO: group_loo baseline, seq_mean, total returns, k1 in the reward", baseline="group_loo",
       aggregation="seq_mean", returns="total", value_coef=0.0),
    _c("dr_grpo", "Dr. GRPO: group_mean without std scaling, fixed_len (norm_len 16), k3 in the loss",
       baseline="group_mean", aggregation="fixed_len", norm_len=16.0, returns="total", kl="k3", kl_in="loss",
       beta=0.04, value_coef=0.0),
    _c("ppo", "PPO: GAE lam 0.95 gamma 1, ppo_clip with a perturbed old_logp, value_clip 0.2, Bessel whitening",
       edge="off_policy", returns="gae", lam=0.95, surrogate="ppo_clip", value_clip=0.2, whiten="bessel",
       value_coef=0.1),
    _c("padding_rows_group_loo_std", "padding rows (no action: in no group's statistics) with group_loo and "
       "GRPO scaling", edge="padding_rows", baseline="group_loo", group_scale="std"),
    # the field's defaults (docs/frameworks.md: TRL 1.16, OpenRLHF 3c3be62, veRL b178a3c), on-policy (ratio 1)
    _c("trl_grpo", "TRL 1.16 GRPOTrainer defaults (loss_type dapo, scale_rewards group, beta 0)", **TRL_GRPO),
    _c("trl_rloo", "TRL 1.16 RLOOTrainer defaults (beta 0.05, k1 in the reward, no advantage normalisation)",
       returns="total", baseline="group_loo", beta=0.05, surrogate="ppo_clip", aggregation="seq_sum",
       value_coef=0.0),
    _c("trl_ppo", "TRL PPO (experimental) defaults: GAE lam 0.95, Bessel whitening, value clip 0.2, vf_coef 0.1",
       returns="gae", lam=0.95, whiten="bessel", beta=0.05, surrogate="ppo_clip", value_clip=0.2, value_coef=0.1),
    _c("openrlhf_ppo", "OpenRLHF PPO defaults: GAE lam 1, population whitening, beta 0.01, value clip 0.5",
       returns="gae", lam=1.0, whiten="population", beta=0.01, surrogate="ppo_clip", value_clip=0.5),
    _c("openrlhf_reinforce_baseline", "OpenRLHF reinforce_baseline: group_mean, population whitening, beta 0.01",
       returns="total", baseline="group_mean", whiten="population", beta=0.01, surrogate="ppo_clip",
       value_coef=0.0),
    _c("openrlhf_grpo", "OpenRLHF group_norm (GRPO): group_mean + std (eps 1e-9), k1 in the reward, beta 0.01",
       returns="total", baseline="group_mean", group_scale="std", group_eps=1e-9, beta=0.01, surrogate="ppo_clip",
       value_coef=0.0),
    _c("verl_grpo", "veRL grpo with use_kl_loss (low_var_kl = k3, 0.001), std eps 1e-6", returns="total",
       baseline="group_mean", group_scale="std", group_eps=1e-6, beta=0.001, kl="k3", kl_in="loss",
       surrogate="ppo_clip", value_coef=0.0),
    # decoding modes, seq_sum over rows with no action, SFT under a non-default policy
    _c("decode_eps_greedy", "the rollout decodes eps-greedy (eps 0.1; the rl section scores with the Boltzmann "
       "eps-mixture)", policy_kind="eps_greedy", eps=0.1),
    _c("decode_greedy", "the rollout decodes greedily (argmax; ties to the lowest id)", policy_kind="greedy"),
    _c("padding_rows_seq_sum", "padding rows with seq_sum: rows without an action are not counted in n_rows",
       edge="padding_rows", aggregation="seq_sum"),
    _c("sft_alpha_eps", "alpha 1.5, eps 0.1 for the policy: the SFT section stays alpha 1, eps 0",
       sections=("rollout", "rl", "sft"), alpha=1.5, eps=0.1),
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
    d.update({"whiten_eps": ret.WHITEN_EPS, "critic": cfg.critic, "policy_kind": spec.policy_kind,
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
        items = dict(c.config, **({"policy": c.policy_kind} if c.policy_kind != "boltzmann" else {}))
        sw = ", ".join(f"{k}={_value_text(v)}" for k, v in items.items()) or "(defaults)"
        lines.append(f"| `{c.name}` | {c.dtype} | {sw} | {c.edge} | {' '.join(c.sections)} | {c.description} |")
    return "\n".join(lines) + "\n"
