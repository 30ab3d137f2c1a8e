"""The table of conventions (rlhf_ref/conventions.py) is the one source of the switches' names,
values, defaults and the kernels' integer codes; these tests hold everything derived to it."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

from rlhf_ref import conventions, policy, reinforce, returns
from rlhf_ref._core import _host
from rlhf_ref.pipeline.rl import RLConfig

CORE = os.path.join(os.path.dirname(conventions.__file__), "_core")


def _read(name):
    with open(os.path.join(CORE, name), encoding="utf-8") as f:
        return f.read()


def test_reinforce_config_is_the_table():
    fields = dataclasses.fields(reinforce.ReinforceConfig)
    assert [f.name for f in fields] == [s.name for s in conventions.SWITCHES]
    assert [f.default for f in fields] == [s.default for s in conventions.SWITCHES]
    for s in conventions.SWITCHES:
        assert s.meaning and s.changes
        if s.values is not None:
            assert s.default in s.values and len(set(s.values)) == len(s.values), s.name


def test_the_reference_tuples_are_the_table():
    assert returns.KL_ESTIMATORS == conventions.values("kl")
    assert returns.RETURNS == conventions.values("returns")
    assert returns.BASELINES == conventions.values("baseline")
    assert returns.WHITEN == conventions.values("whiten")
    assert reinforce.AGGREGATIONS == conventions.values("aggregation")
    assert policy.KINDS == conventions.values("policy")


def test_rl_config_has_every_switch():
    """RLConfig inherits ReinforceConfig: a new switch reaches the RL stage and ``--set``."""
    names = {f.name for f in dataclasses.fields(RLConfig)}
    assert {s.name for s in conventions.SWITCHES} <= names
    cfg = RLConfig(shift_mean=False, whiten="bessel", kl="k3")
    rc = cfg.reinforce_config()
    assert type(rc) is reinforce.ReinforceConfig
    assert (rc.shift_mean, rc.whiten, rc.kl, rc.beta) == (False, "bessel", "k3", RLConfig.beta)
    with pytest.raises(ValueError, match="kl must be one of"):
        RLConfig(kl="k9")


def test_apply_sets_types_come_from_the_table():
    from rlhf_ref.pipeline.commands import CommandError, apply_sets
    cfg = apply_sets(RLConfig(), ["shift_mean=false", "kl=k2", "gamma=0.5", "steps=3"])
    assert (cfg.shift_mean, cfg.kl, cfg.gamma, cfg.steps) == (False, "k2", 0.5, 3)
    with pytest.raises(CommandError, match="shift_mean must be a bool"):
        apply_sets(RLConfig(), ["shift_mean=2"])


def test_kernel_codes_are_the_tables_indices():
    for name, codes in _host.CODES.items():
        assert list(codes) == list(conventions.values(name)) and list(codes.values()) == list(range(len(codes)))
    cfg = reinforce.ReinforceConfig(kl="k3", returns="total", baseline="loo", whiten="bessel", aggregation="seq_sum")
    codes = _host.chain_codes(cfg)
    assert [codes[k] for k in ("kl", "returns", "baseline", "whiten", "aggregation")] == [2, 1, 3, 2, 2]
    assert codes["kl_in"] == codes["group_scale"] == codes["surrogate"] == 0       # the defaults: index 0


def test_kernels_hold_no_names_and_their_constants_match_the_table():
    """The kernels receive codes; where one names a code (policy kinds), it equals the table's."""
    kinds = _host.CODES["policy"]
    for f in os.listdir(CORE):
        if f.endswith((".py", ".pyx", ".pxd")) and f not in ("_host.py",):
            assert not re.search(r"\w+_CODES\s*=", _read(f)), f"{f} keeps its own name→code table"
    pxd = _read("_policy_cy.pxd")
    for name in ("BOLTZMANN", "EPS_GREEDY", "GREEDY"):
        assert int(re.search(rf"\b{name} = (\d+)", pxd).group(1)) == kinds[name.lower()], f"_policy_cy.pxd {name}"
    m = re.search(r"^BOLTZMANN, EPS_GREEDY, GREEDY = (\d+), (\d+), (\d+)", _read("_policy_nb.py"), re.M)
    assert tuple(map(int, m.groups())) == (kinds["boltzmann"], kinds["eps_greedy"], kinds["greedy"])
    assert int(re.search(r"^_BOLTZMANN = (\d+)", _read("_rollout_cuda.py"), re.M).group(1)) == kinds["boltzmann"]


@pytest.mark.parametrize("est", conventions.values("kl"))
def test_kl_estimate_values_and_derivative(est):
    """Every estimator of the table has a formula; known values; dk/dx by float64 central differences."""
    x = np.array([-2.0, -0.3, 0.0, 1e-6, 0.7, 3.0])
    k = returns.kl_estimate(x, est)
    want = {"k1": x, "k2": x * x / 2, "k3": np.exp(-x) - 1 + x}.get(est)   # the definitions, written out
    if want is None:
        pytest.fail(f"no written-out definition of KL estimator {est!r} in this test: add it")
    np.testing.assert_allclose(k, want, rtol=1e-12, atol=1e-15)
    h = 1e-6
    fd = (returns.kl_estimate(x + h, est) - returns.kl_estimate(x - h, est)) / (2 * h)
    np.testing.assert_allclose(returns.kl_estimate_grad(x, est), fd, rtol=1e-7, atol=1e-9)


def test_tuning_parameters_compiled_into_the_kernels_equal_the_config():
    """_common_cy.pxd compiles the small-matrix row range in; _config.py is where Python reads it."""
    from rlhf_ref._core import _config
    pxd = _read("_common_cy.pxd")
    assert int(re.search(r"SMM_MIN_ROWS = (\d+)", pxd).group(1)) == _config.CYTHON_SMM_MIN_ROWS
    assert int(re.search(r"SMM_MAX_ROWS = (\d+)", pxd).group(1)) == _config.CYTHON_SMM_MAX_ROWS


# ---------------------------------------------------------------------------------------------
# issue 9: the combinations ReinforceConfig refuses and the new inputs' checks (messages name them)

def test_config_refuses_combinations_that_have_no_meaning():
    with pytest.raises(ValueError, match=r"returns='gae' needs baseline='value'.*baseline='mean'"):
        reinforce.ReinforceConfig(returns="gae", baseline="mean")
    with pytest.raises(ValueError, match=r"group_scale='std' needs baseline='group_mean' or 'group_loo'"):
        reinforce.ReinforceConfig(group_scale="std", baseline="value")
    with pytest.raises(ValueError, match="lam must be <= 1.0"):
        reinforce.ReinforceConfig(lam=1.5)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        reinforce.ReinforceConfig(clip_high=-0.1)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        reinforce.ReinforceConfig(surrogate="ppo")
    with pytest.raises(ValueError, match="kl_in must be one of"):
        RLConfig(kl_in="advantage")
    rc = RLConfig(returns="gae", lam=0.95, surrogate="ppo_clip", clip_high=0.28).reinforce_config()
    assert (rc.returns, rc.lam, rc.surrogate, rc.clip_high) == ("gae", 0.95, "ppo_clip", 0.28)


def _tiny():
    from rlhf_ref import lstm
    p = lstm.init_params(5, 3, 4, np.random.default_rng(0), heads=("head", "value"))
    tokens = np.array([[1, 3, 4, 2], [1, 4, 3, 0], [1, 2, 3, 3]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1.0]])
    return p, tokens, mask, np.array([1, 1, 2]), np.array([1.0, -1.0, 0.5]), np.zeros((3, 4))


@pytest.mark.parametrize("cfg,kw,err,msg", [
    (dict(baseline="group_mean"), {}, ValueError, r"baseline='group_mean' needs group"),
    (dict(baseline="group_loo"), dict(group=np.array([0, 0, 1])), ValueError,
     r"group_loo.*two or more rows with an action in every group; group 1 of group has 1"),
    (dict(baseline="group_mean", group_scale="std"), dict(group=np.array([0, 1, 1])), ValueError,
     r"group_scale='std' needs two or more rows.*group 0 of group"),
    (dict(baseline="group_mean"), dict(group=np.array([0.0, 0.0, 1.0])), TypeError, r"group must be an integer array"),
    (dict(), dict(group=np.array([0, 0])), ValueError, r"group must have shape \(3,\)"),
    (dict(surrogate="ppo_clip"), dict(old_logp=np.zeros((3, 3))), ValueError, r"old_logp must have shape"),
    (dict(surrogate="ppo_clip"), dict(old_logp=np.full((3, 4), np.nan)), ValueError, r"old_logp must be finite"),
    (dict(value_clip=0.2), {}, ValueError, r"value_clip=0.2 needs old_values"),
    (dict(value_clip=0.2), dict(old_values=np.zeros((4, 3))), ValueError, r"old_values must have shape"),
    (dict(baseline="group_mean", group_scale="std", group_eps=0.0, beta=0.0), dict(group=np.array([0, 0, 0])),
     None, None),
])
def test_new_inputs_are_checked_with_messages_naming_them(cfg, kw, err, msg):
    p, tokens, mask, pl, R, rl = _tiny()
    c = reinforce.ReinforceConfig(**cfg)
    if err is None:             # σ_g = 0 and group_eps = 0: refused, never a silent inf/nan
        with pytest.raises(ValueError, match="group_eps=0 divides by σ_g = 0"):
            reinforce.loss_and_grad(p, tokens, mask, pl, np.ones(3), c, ref_logp=rl, **kw)
        out, _ = reinforce.loss_and_grad(p, tokens, mask, pl, R, c, ref_logp=rl, **kw)
        assert np.all(np.isfinite(out["advantages"]))
        return
    with pytest.raises(err, match=msg):
        reinforce.loss_and_grad(p, tokens, mask, pl, R, c, ref_logp=rl, **kw)


def test_group_is_validated_even_when_unused_and_ignored_otherwise():
    p, tokens, mask, pl, R, rl = _tiny()
    with pytest.raises(ValueError, match=r"group must have shape \(3,\)"):
        reinforce.loss_and_grad(p, tokens, mask, pl, R, ref_logp=rl, group=np.zeros(4, int))
    o1, g1 = reinforce.loss_and_grad(p, tokens, mask, pl, R, ref_logp=rl)
    o2, g2 = reinforce.loss_and_grad(p, tokens, mask, pl, R, ref_logp=rl, group=np.array([0, 1, 2]),
                                     old_values=np.ones((3, 4)))
    assert all(np.array_equal(g1[k], g2[k]) for k in g1) and o1["loss"] == o2["loss"]
    assert o1["loss_kl"] == 0.0 and np.array_equal(o1["ratio"], o1["action_mask"])


@pytest.mark.parametrize("kw", [dict(kl_in="loss"), dict(returns="gae"), dict(baseline="group_loo"),
                                dict(surrogate="ppo_clip"), dict(value_clip=0.1), dict(aggregation="fixed_len")])
def test_the_distributed_stage_computes_every_convention(kw):
    """pipeline/distributed.py has no copy of the batch statistics: it runs ``reinforce.chain`` on the
    gathered arrays, so every convention gives the reference's numbers and its errors."""
    from rlhf_ref.pipeline import distributed
    am = np.array([[0, 1, 1.0], [0, 1, 0.0]])
    rng = np.random.default_rng(0)
    logp, ref, vals, ent, old = (np.where(am > 0, rng.normal(size=(2, 3)), 0.0) for _ in range(5))
    R, group, cfg = np.array([0.5, -1.0]), np.array([3, 3]), reinforce.ReinforceConfig(**kw)
    got = distributed.global_statistics(am, logp, ref, vals, ent, R, cfg, group=group, old_logp=old, old_values=old)
    want = reinforce.chain(cfg, am, logp, ref, ent, R, vals, vals, None, group, old, old)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    if cfg.baseline == "group_loo":
        with pytest.raises(ValueError, match="needs group"):
            distributed.global_statistics(am, logp, ref, vals, ent, R, cfg)
    if cfg.value_clip > 0:
        with pytest.raises(ValueError, match="needs old_values"):
            distributed.global_statistics(am, logp, ref, vals, ent, R, cfg, group=group)
