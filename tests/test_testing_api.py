"""rlhf_ref.testing: the assert-style API over the verifier (pass, a named failure, a wrong layout,
a missing output, a typo, load_case)."""

import numpy as np
import pytest

from rlhf_ref import testing


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return testing.golden_dir(tmp_path_factory.mktemp("golden"), names=["base", "gamma_0_9"])


def _outs(case, names=("returns", "advantages", "weights")):
    return {n: case.expected[n].copy() for n in names}


def test_load_case_gives_inputs_config_and_expected(golden):
    case = testing.load_case("gamma_0_9", golden)
    assert case.config["gamma"] == 0.9 and case.config["returns"] == "rtg"
    B, T = case.dims["B"], case.dims["T"]
    assert case.inputs["tokens"].shape == (B, T) and case.inputs["reward"].shape == (B,)
    assert case.expected["advantages"].shape == (B, T)
    assert "returns" in case.output_names


def test_case_names_filters_by_section_and_by_the_callers_predicate(tmp_path):
    g = testing.golden_dir(tmp_path, names=["base", "gamma_0_9", "ppo", "gae_lam_0_95", "rloo"])
    every = sorted(["base", "gamma_0_9", "ppo", "gae_lam_0_95", "rloo"])
    assert sorted(testing.case_names(g)) == every                # all five have the "rl" section
    gae = testing.case_names(g, lambda config, inputs: config["returns"] == "gae")
    assert sorted(gae) == ["gae_lam_0_95", "ppo"]
    fresh = testing.case_names(g, lambda config, inputs: "old_logp" not in inputs)
    assert "ppo" not in fresh and "base" in fresh                # ppo's batch carries old log-probs
    assert testing.case_names(g, section="no such section") == []
    assert sorted(testing.case_names(g, section=None)) == every


def test_golden_dir_writes_once(golden):
    assert testing.golden_dir(golden) == str(golden)           # a manifest is there: not rewritten


def test_pass_returns_the_report(golden):
    case = testing.load_case("base", golden)
    rep = testing.assert_matches_golden(_outs(case), "base", golden)
    assert rep.ok and sorted(rep.checked) == ["advantages", "returns", "weights"]


def test_default_golden_is_generated():
    case = testing.load_case("base")
    testing.assert_matches_golden(_outs(case, ("returns",)), "base")


def test_fail_names_the_quantity_and_where(golden):
    case = testing.load_case("base", golden)
    outs = _outs(case)
    am = case.expected["action_mask"] > 0
    b, t = np.argwhere(am)[-1]
    outs["advantages"][b, t] += 0.5
    with pytest.raises(AssertionError) as ei:
        testing.assert_matches_golden(outs, "base", golden)
    msg = str(ei.value)
    assert "FAIL base" in msg and "advantages" in msg and f"[{b}, {t}]" in msg
    assert "returns" not in msg.split("advantages")[0].split("FAIL base")[1]   # returns matched


def test_returns_shifted_by_one_step_is_diagnosed(golden):
    case = testing.load_case("gamma_0_9", golden)
    am = case.expected["action_mask"] > 0
    g = case.expected["returns"]
    shifted = np.where(am, np.concatenate([g[:, 1:], np.zeros((g.shape[0], 1))], 1), 0.0)
    with pytest.raises(AssertionError, match=r"returns"):
        testing.assert_matches_golden({"returns": shifted}, "gamma_0_9", golden)


def test_wrong_layout_fails(golden):
    case = testing.load_case("base", golden)
    outs = _outs(case, ("returns",))
    # token-aligned arrays declared as the shifted (B, T-1) layout: the shape is wrong for it
    with pytest.raises(AssertionError, match=r"returns"):
        testing.assert_matches_golden(outs, "base", golden, layout="shifted")
    # the same values, moved to the shifted layout, pass when declared
    shifted = {"returns": outs["returns"][:, 1:]}
    testing.assert_matches_golden(shifted, "base", golden, layout="shifted")
    with pytest.raises(ValueError, match="layout"):
        testing.assert_matches_golden(outs, "base", golden, layout="columns")


def test_missing_required_output_fails(golden):
    case = testing.load_case("base", golden)
    with pytest.raises(AssertionError, match=r"missing outputs \(required\): advantages"):
        testing.assert_matches_golden(_outs(case, ("returns",)), "base", golden, require=("returns", "advantages"))


def test_a_typo_is_not_silently_unchecked(golden):
    case = testing.load_case("base", golden)
    with pytest.raises(AssertionError, match=r"not golden outputs of case 'base' \(a typo\?\): advantage\b"):
        testing.assert_matches_golden({"advantage": case.expected["advantages"]}, "base", golden)


def test_bad_arguments(golden):
    with pytest.raises(KeyError, match="no golden case named 'nope'"):
        testing.load_case("nope", golden)
    with pytest.raises(TypeError, match="outputs must be a non-empty dict"):
        testing.assert_matches_golden({}, "base", golden)
