"""The worked examples of examples/frameworks/: the REAL functions of Stable-Baselines3 and TRL
(installed from PyPI with the pinned versions of the `frameworks` extra) checked against the
golden vectors. Without the packages the tests skip, except under RLHF_REF_REQUIRE_FRAMEWORKS=1
(CI, scripts/test.sh), where a missing package is a failure."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from rlhf_ref import testing
from rlhf_ref.golden import vectors as gv

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINS = {"stable_baselines3": "2.9.2", "trl": "1.16.0"}      # pyproject.toml's `frameworks` extra


def _need(module):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("RLHF_REF_REQUIRE_FRAMEWORKS") == "1":
            pytest.fail(f"RLHF_REF_REQUIRE_FRAMEWORKS=1 but {module} cannot be imported: {e}")
        pytest.skip(f"{module} not installed (pip install 'rlhf-ref[frameworks]')")
    if os.environ.get("RLHF_REF_REQUIRE_FRAMEWORKS") == "1":
        assert mod.__version__ == PINS[module], f"{module} {mod.__version__} installed, the extra pins {PINS[module]}"
    return mod




def _example(name):
    spec = importlib.util.spec_from_file_location(f"_fw_{name}", ROOT / "examples" / "frameworks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return testing.golden_dir(tmp_path_factory.mktemp("golden"))


def _cases(golden, applicable):
    return testing.case_names(golden, lambda config, inputs: applicable(config) and "old_logp" not in inputs)


def _trl_cases(golden, trl_ex):
    return testing.case_names(golden, trl_ex.applicable)


# ------------------------------------------------------------------ Stable-Baselines3 GAE

@pytest.fixture(scope="module")
def sb3(golden):
    _need("stable_baselines3")
    return _example("sb3_gae")


def test_sb3_gae_matches_every_value_baseline_case(sb3, golden):
    names = _cases(golden, sb3.applicable)
    assert len(names) >= 20, names                       # base, gamma_0_9, kl_*, padding_rows, ... (and gae)
    assert {"base", "base_f32", "gamma_0_9", "padding_rows", "single_token"} <= set(names)
    for n in names:
        rep = sb3.check(n, golden)
        assert "returns" in rep.checked


def test_sb3_gae_lambda_cases_are_checked_when_present(sb3, golden):
    gae = testing.case_names(golden, lambda config, inputs: config.get("returns") == "gae", section=None)
    for n in gae:                                        # i9ref's returns="gae" cases (λ < 1), once they exist
        rep = sb3.check(n, golden)
        assert "returns" in rep.checked


def test_sb3_check_can_fail(sb3, golden):
    """A wrong mapping (SB3 run with another γ) fails, and the message names the quantity."""
    case = testing.load_case("gamma_0_9", golden)
    case.config["gamma"] = 1.0
    outs = sb3.sb3_outputs(case)
    with pytest.raises(AssertionError, match=r"returns"):
        testing.assert_matches_golden(outs, "gamma_0_9", golden)


# ------------------------------------------------------------------ TRL GRPO loss

@pytest.fixture(scope="module")
def trl_ex(golden):
    _need("trl")
    return _example("trl_grpo_loss")


def test_trl_grpo_loss_matches(trl_ex, golden):
    names = _trl_cases(golden, trl_ex)
    aggs = {testing.load_case(n, golden).config["aggregation"] for n in names}
    assert {"token_mean", "seq_mean"} <= aggs and len(names) >= 20, names
    for n in names:
        assert trl_ex.check(n, golden)


def test_trl_wrong_loss_type_fails(trl_ex, golden):
    """A token_mean case compared with TRL's per-sequence "grpo" aggregation does not match."""
    case = testing.load_case("base", golden)
    loss, grad = trl_ex.trl_loss_and_grad(case, "grpo")
    want_loss, want_grad = trl_ex.expected(case, "bnpo")
    assert not np.allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


def test_trl_grpo_averages_over_all_rows(trl_ex, golden):
    """The documented difference (docs/frameworks.md §3): TRL's "grpo" divides by B, rows without
    an action included; our seq_mean by the rows with an action."""
    case = testing.load_case("padding_rows_seq_mean_loo", golden)
    am = case.expected["action_mask"] > 0
    assert not am.any(1).all()
    loss, _ = trl_ex.trl_loss_and_grad(case, "grpo")
    ours = float(np.sum(-case.expected["weights"] * case.expected["advantages"]))
    np.testing.assert_allclose(loss, ours * am.any(1).sum() / am.shape[0], rtol=1e-10)
    assert not np.isclose(loss, ours)


def test_pins_agree_with_pyproject_and_ci():
    """One set of versions: the `frameworks` extra, scripts/test.sh and PINS above."""
    import tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["frameworks"]
    script = (ROOT / "scripts" / "test.sh").read_text()
    for module, ver in PINS.items():
        dist = module.replace("_", "-")
        assert f"{dist}=={ver}" in extra, extra
        assert f'"{dist}=={ver}"' in script
    assert "RLHF_REF_REQUIRE_FRAMEWORKS=1" in script


def _doc_commands():
    import re
    block = (ROOT / "docs" / "frameworks.md").read_text().split("```sh")[1].split("```")[0]
    return [c for c in re.sub(r"\\\n\s*", " ", block).splitlines() if c.startswith("rlhf-ref vectors")]


@pytest.fixture(scope="module")
def doc_cases(tmp_path_factory):
    """Each `rlhf-ref vectors --out DIR --set ...` command of docs/frameworks.md §2, run as written
    (rlhf_ref.cli.main): one folder per framework configuration."""
    from rlhf_ref import cli

    out = []
    for i, c in enumerate(_doc_commands()):
        d = tmp_path_factory.mktemp(f"doc{i}")
        args = [str(d) if a == "DIR" else a for a in c.split()[1:]]
        assert cli.main(args) == 0, c
        out.append((c, d))
    return out


def test_every_set_line_of_the_doc_builds_a_case(doc_cases):
    from rlhf_ref import conventions as cv

    assert len(doc_cases) >= 6
    for c, d in doc_cases:
        (e,) = gv.load_manifest(d)["cases"]
        for s in c.split("--set ")[1:]:
            k, v = s.split()[0].split("=", 1)
            want = (v == "true") if cv.TABLE[k].is_bool else cv.TABLE[k].type(v)
            assert e["config"][k] == want, (c, k)


def test_the_docs_framework_configurations_match_the_frameworks(doc_cases, sb3, trl_ex):
    """The doc's TRL GRPO / TRL RLOO / PPO-style --set lines build cases that the real TRL loss and
    SB3 GAE reproduce (each command's case goes through every check that applies to it)."""
    checked = set()
    for c, d in doc_cases:
        (e,) = gv.load_manifest(d)["cases"]
        if trl_ex.applicable(e["config"], e["inputs"]):
            trl_ex.check(e["name"], d)
            checked.add("trl_grpo")
        if trl_ex.rloo_applicable(e["config"]) and "old_logp" not in e["inputs"]:
            trl_ex.check_rloo(e["name"], d)
            checked.add("trl_rloo")
        if sb3.applicable(e["config"]):
            sb3.check(e["name"], d)
            checked.add("sb3")
    assert checked == {"trl_grpo", "trl_rloo", "sb3"}


def test_trl_rloo_loss_gradient(trl_ex, tmp_path, monkeypatch):
    """TRL's RLOOTrainer._compute_loss (a per-sequence ratio and loss): its gradient at ratio 1 is our
    seq_sum gradient with returns="total" (one advantage per row) times (rows with an action)/B. The
    shipped cases have no such configuration yet, so three are built here from the case table's
    recipe (padding rows and float32 included); shipped ones are checked too when present."""
    from rlhf_ref.golden import cases as gc

    extra = (gc._c("fw_rloo_loo", "total returns, leave-one-out, seq_sum, beta 0.05", returns="total",
                   baseline="loo", aggregation="seq_sum", beta=0.05),
             gc._c("fw_rloo_padding", "padding rows, batch mean, Bessel whitening", edge="padding_rows",
                   returns="total", baseline="mean", aggregation="seq_sum", whiten="bessel"),
             gc._c("fw_rloo_f32", "float32, no baseline", dtype="float32", returns="total", baseline="none",
                   aggregation="seq_sum"))
    shipped = [c.name for c in gc.CASES if "rl" in c.sections and trl_ex.rloo_applicable(gc.config_of(c))]
    monkeypatch.setattr(gc, "CASES", gc.CASES + extra)
    monkeypatch.setattr(gv, "CASES", gc.CASES)
    folder = testing.golden_dir(tmp_path / "golden", names=[c.name for c in extra] + shipped)
    for n in [c.name for c in extra] + shipped:
        assert trl_ex.check_rloo(n, folder) == ("rloo",)
    # and it can fail: the token-weighted (token_mean) gradient is not RLOO's
    case = testing.load_case("fw_rloo_loo", folder)
    _, grad = trl_ex.trl_rloo_loss_and_grad(case)
    am = case.expected["action_mask"] > 0
    tm = np.where(am, 1.0 / am.sum(), 0.0)
    assert not np.allclose(grad, -tm * case.expected["advantages"], rtol=1e-6, atol=1e-9)


def test_trl_off_policy_clipping_is_exercised(trl_ex, golden):
    """The off-policy ppo_clip cases (an old_logp input) go through TRL's clipping with the case's
    clip_low/clip_high; at least one of them has actions where the clipped branch is the min, so
    the zero-gradient branch is compared, not only ratio-weighted REINFORCE."""
    off = [n for n in _trl_cases(golden, trl_ex) if "old_logp" in testing.load_case(n, golden).inputs]
    active = 0
    for n in off:
        case = testing.load_case(n, golden)
        g, cfg = case.expected, case.config
        rho, A = g["ratio"], g["advantages"]
        clipped = np.clip(rho, 1 - cfg["clip_low"], 1 + cfg["clip_high"]) * A
        active += int(np.sum((rho * A > clipped) & (g["action_mask"] > 0)))
        trl_ex.check(n, golden)
    assert off, "no off-policy ppo_clip golden case (ppo_clip, dapo_clip_higher, ppo: i9ref's issue-9 cases)"
    assert active > 0
