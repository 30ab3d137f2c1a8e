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
    assert _host.reinforce_codes(cfg) == (2, 1, 3, 2, 2)


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
