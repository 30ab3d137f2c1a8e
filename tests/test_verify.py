"""The verifier (rlhf_ref.verify): no false alarm on correct outputs, and each planted mistake is
flagged at the right quantity with the right hint.

Two kinds of "other implementation":
* the golden outputs themselves, and the reference rerun natively in float32, edited by hand
  (NumPy only: layout, masking, not-produced quantities, CLI, ties);
* examples/torch_reference.py, an independent PyTorch implementation, with mistakes planted in
  its small functions by monkeypatching (needs torch: ``pip install torch==2.13.0``).
"""

from __future__ import annotations

import importlib.util
import os
from argparse import Namespace

import numpy as np
import pytest

from rlhf_ref import vectors as gv, verify as vf

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "golden")
EXAMPLE = os.path.join(HERE, os.pardir, "examples", "torch_reference.py")


@pytest.fixture(scope="module")
def manifest():
    return gv.load_manifest(GOLDEN)


@pytest.fixture(scope="module")
def golden(manifest):
    return {e["name"]: (e, gv.load_case(manifest, e)) for e in manifest["cases"]}


def outputs(golden, name):
    e, a = golden[name]
    return dict(gv.outputs_of(e, a))


def check(golden, name, out, **kw):
    e, a = golden[name]
    return vf.verify_case(e, a, out, **kw)


# ============================================================================ no false alarms

def test_golden_outputs_pass(golden):
    rep = vf.verify(GOLDEN, {n: outputs(golden, n) for n in golden})
    assert rep.ok and rep.exit_code == 0, rep.format()
    assert rep.n_checked == sum(len(e["outputs"]) for e, _ in golden.values())


def test_reference_run_natively_in_the_case_dtype_passes(golden):
    """The float32 cases computed in float32 (not rounded from float64) are within tolerance."""
    outs = {}
    for n, (e, a) in golden.items():
        outs[n] = gv.compute(gv.inputs_of(e, a), e["config"], e["sections"], dtype=np.dtype(e["config"]["dtype"]))
    rep = vf.verify(GOLDEN, outs)
    assert rep.ok, rep.format()


# ============================================================================ hand-planted (NumPy)

def test_not_produced_quantities_are_not_checked(golden):
    out = {k: v for k, v in outputs(golden, "base").items()
           if k in ("logp", "kl", "returns", "loss") or k.startswith("grad/loss/")}
    rep = check(golden, "base", out)
    assert rep.ok and "scores" in rep.not_checked and "grad/loss_pg/policy/head.weight" in rep.not_checked
    assert set(rep.checked) == set(out)


def test_one_case_dict_needs_its_name(golden):
    rep = vf.verify(GOLDEN, outputs(golden, "base"), names=["base"])
    assert rep.ok and len(rep.cases) == 1
    with pytest.raises(TypeError, match="names="):
        vf.verify(GOLDEN, outputs(golden, "base"))


def test_missing_case_and_nothing_checked(golden):
    rep = vf.verify(GOLDEN, {"base": outputs(golden, "base")})
    assert rep.ok and sum(c.missing for c in rep.cases) == len(golden) - 1
    assert "no outputs for" in rep.format()
    rep = vf.verify(GOLDEN, {"base": {"something_else": np.zeros(3)}})
    assert not rep.ok and "nothing was checked" in rep.format()


def test_masking_is_a_separate_named_finding(golden):
    out = outputs(golden, "padding_rows")
    out["logp"] = np.where(out["logp"] == 0, -0.7, out["logp"])          # values on prompt and padding
    rep = check(golden, "padding_rows", out)
    assert not rep.ok
    [f] = rep.findings
    assert f.kind == "masking" and f.quantity == "logp"
    assert "column 0" in f.message and "prompt" in f.message and "padding" in f.message
    assert "all-padding row" in f.message
    assert rep.first() is None                                           # the values on the mask match
    assert check(golden, "padding_rows", out, strict_mask=False).ok      # lenient: a note


def test_shifted_layout_is_accepted_when_declared(golden):
    out = {k: (v[:, 1:] if gv.time_aligned(k) else v) for k, v in outputs(golden, "padding_rows").items()}
    assert check(golden, "padding_rows", out, layout="shifted").ok
    assert check(golden, "padding_rows", dict(out, layout=np.array("shifted"))).ok
    rep = check(golden, "padding_rows", out)
    f = rep.first("rl")
    assert f.kind == "shape" and f.quantity == "action_mask" and "shifted" in f.message


def test_loss_sign(golden):
    out = outputs(golden, "base")
    out["loss_pg"] = -out["loss_pg"]
    f = check(golden, "base", out).first("rl")
    assert f.quantity == "loss_pg" and "wrong sign" in f.hint


def test_loss_with_padding_in_the_mean(golden):
    """An implementation without `weights` whose loss_pg averages over all B·T positions."""
    out = outputs(golden, "padding_rows")
    del out["weights"]
    out["loss_pg"] = np.asarray(-np.sum(out["advantages"] * out["logp"]) / out["logp"].size)
    f = check(golden, "padding_rows", out).first("rl")
    assert f.quantity == "loss_pg" and f.hint.startswith("masking:") and "B·T positions" in f.hint


def test_float32_outputs_in_a_float64_case(golden):
    out = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in outputs(golden, "base").items()}
    f = check(golden, "base", out).first("rl")
    assert f.quantity == "scores" and "float32 in a float64 case" in f.hint


def test_ratio_reversed_k3(golden):
    out = outputs(golden, "kl_k3")
    e, a = golden["kl_k3"]
    x = np.where(a["action_mask"] > 0, a["logp"] - a["ref_logp"], 0.0)
    out["kl"] = np.expm1(x) - x                                           # trlX / rlhf-book approx_kl3
    f = check(golden, "kl_k3", out).first("rl")
    assert f.quantity == "kl" and "k3 with the ratio reversed" in f.hint


def test_gradient_hints_without_torch(golden):
    out = outputs(golden, "value_coef_1")
    for k in out:
        if k.startswith("grad/loss_value/"):
            out[k] = 2 * out[k]
    f = check(golden, "value_coef_1", out).first("rl")
    assert f.quantity.startswith("grad/loss_value/") and "2× the expected" in f.hint and "½" in f.hint
    out = outputs(golden, "base")
    out["grad/loss/policy/head.bias"] = out["grad/loss/policy/head.bias"] + 1e-3
    f = check(golden, "base", out).first("rl")
    assert f.quantity == "grad/loss/policy/head.bias" and "values match" in f.hint


def test_rollout_tie_is_accepted(golden):
    """A token that differs where u sits on a CDF boundary is a tie: the row is compared up to there."""
    e, a = golden["base"]
    a = dict(a)
    b, t = map(int, np.argwhere(a["rollout/action_mask"] > 0)[0])
    pol = {k.split("/", 1)[1]: a[k] for k in e["inputs"] if k.startswith("policy/")}
    from rlhf_ref import model, policy
    fwd, _ = model.forward(pol, a["rollout/tokens"], a["rollout/mask"])
    cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], 1.0, 0.0)), -1)[b, t]
    tok = int(a["rollout/tokens"][b, t])
    u = a["rollout/u"].copy()
    u[b, t] = cdf[tok - 1] if tok > 0 else cdf[0]                         # exactly on a boundary
    a["rollout/u"] = u
    out = dict(gv.outputs_of(e, a))
    got = out["rollout/tokens"].copy()
    got[b, t] = tok - 1 if tok > 0 else 1                                 # the other side of the tie
    got[b, t + 1:] = 0
    out["rollout/tokens"] = got
    rep = vf.verify_case(e, a, out)
    assert rep.first("rollout") is None, rep.format()
    assert any(f.kind == "note" and "tie" in f.message for f in rep.findings)


def test_report_is_short_and_ordered(golden):
    outs = {n: outputs(golden, n) for n in ("base", "kl_k3", "gamma_0_9")}
    outs["gamma_0_9"]["returns"] = np.zeros_like(outs["gamma_0_9"]["returns"])
    text = vf.verify(GOLDEN, outs).format()
    lines = text.splitlines()
    assert lines[0].startswith(f"rlhf-ref verify: {len(golden)} cases, 2 pass, 1 fail")
    assert lines[1].startswith("FAIL gamma_0_9")                           # failures first
    assert "[rl] returns:" in lines[2] and "worst [" in lines[2]
    assert len(lines) <= 8, text


def test_cli_exit_status(golden, tmp_path, capsys):
    for n in ("base", "kl_k2"):
        np.savez(tmp_path / f"{n}.npz", **outputs(golden, n))
    args = Namespace(cases=GOLDEN, outputs=str(tmp_path), layout=None, names=None, lenient_mask=False, verbose=False)
    assert vf.main(args) == 0
    out = outputs(golden, "kl_k2")
    out["kl"] = out["kl"] * 2
    np.savez(tmp_path / "kl_k2.npz", **out)
    assert vf.main(args) == 1
    text = capsys.readouterr().out
    assert "FAIL kl_k2" in text and "kl:" in text
    assert vf.main(Namespace(**{**vars(args), "cases": str(tmp_path)})) == 2          # no manifest there


def test_cli_verify_through_rlhf_ref_command(golden, tmp_path):
    from rlhf_ref import cli
    np.savez(tmp_path / "base.npz", **outputs(golden, "base"))
    assert cli.main(["verify", GOLDEN, str(tmp_path), "--case", "base"]) == 0


def test_every_hint_candidate_runs(golden):
    """Each value mistake of the catalogue, planted as the implementation's value (upstream golden),
    is reported at that quantity, without an exception (three cases that exercise every branch)."""
    from rlhf_ref.golden import compare, mistakes as mk
    for name in ("all_on", "padding_rows_seq_mean_loo", "qvalue_eps"):
        e, a = golden[name]
        gold = gv.outputs_of(e, a)
        for n in ("kl", "rewards", "returns", "baseline", "advantages", "weights", "loss_pg", "loss_ent",
                  "loss_value", "loss", "entropy"):
            ctx = compare.Ctx(e, a)
            ctx.impl = gold
            for m in mk.MISTAKES:
                if m.kind != "value" or not m.applies_to(n) or m.quantity == (mk.ANY,):
                    continue
                cand = m.compute(ctx, n)
                if cand is None:
                    continue
                out = dict(gold)
                out[n] = np.asarray(cand).astype(a[n].dtype)
                f = vf.verify_case(e, a, out).first("rl")
                assert f is None or f.quantity == n, (name, n, m.name, f.quantity)
                assert f is None or f.hint, (name, n, m.name)


# ============================================================================ the PyTorch example

@pytest.fixture(scope="module")
def tr():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("torch_reference_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.torch
def test_torch_example_passes_every_case(tr, tmp_path):
    assert tr.main([GOLDEN, str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(e + ".npz" for e in gv.case_names())


def _planted(tr, monkeypatch, cases, **patches):
    for k, v in patches.items():
        monkeypatch.setattr(tr, k, v)
    return vf.verify(GOLDEN, tr.run_all(GOLDEN, cases), names=cases)


def _igfo(state):
    import torch
    out = dict(state)
    for k, v in state.items():
        if k.startswith("lstm."):
            i, f, g, o = torch.chunk(v, 4, dim=0)
            out[k] = torch.cat([i, g, f, o])                               # a loader that assumes i, g, f, o
    return out


def _plants(tr):
    import torch
    orig = {k: getattr(tr, k) for k in ("discounted_returns", "kl_estimate", "policy_log_probs", "compute_baseline",
                                        "entropy")}

    def returns_off_by_one(r, am, gamma, kind):
        G = orig["discounted_returns"](r, am, gamma, kind)
        out = torch.zeros_like(G)
        out[:, :-1] = G[:, 1:]
        return out * am

    def whiten_torch_var(A, am, kind, shift_mean):                          # torch.var is Bessel by default
        if kind == "off":
            return A
        x = A.detach()[am > 0]
        out = (A - x.mean()) / torch.sqrt(x.var() + 1e-8)
        return (out if shift_mean else out + x.mean()) * am

    def kl_not_detached(logp, ref_logp, kind):
        x = logp - ref_logp
        return {"k1": x, "k2": 0.5 * x * x, "k3": torch.expm1(-x) + x}[kind]

    def baseline_not_detached(kind, G, am, values=None, qvalues=None, logq=None):
        return values * am if kind == "value" else orig["compute_baseline"](kind, G, am, values, qvalues, logq)

    return {
        # name: (cases, patches, section, quantity (prefix), hint substring)
        "loss sign": (["base", "all_on_f32"], {"pg_loss": lambda w, a, lp: (w * a * lp).sum()}, "rl", "loss_pg",
                      "wrong sign"),
        "off-by-one returns": (["gamma_0_9", "base"], {"discounted_returns": returns_off_by_one}, "rl", "returns",
                               "reward-to-go shifted by one step"),
        "reversed KL ratio k1": (["base"], {"kl_estimate": lambda lp, rl, k: orig["kl_estimate"](rl, lp, k)}, "rl",
                                 "kl", "k1 with the ratio reversed"),
        "reversed KL ratio k3": (["kl_k3", "all_on"], {"kl_estimate": lambda lp, rl, k: orig["kl_estimate"](rl, lp, k)},
                                 "rl", "kl", "k3 with the ratio reversed"),
        "whitening variance": (["whiten_population", "whiten_no_shift"], {"whiten": whiten_torch_var}, "rl",
                               "advantages", "Bessel's correction"),
        "missing mask (mean over all positions)": (
            ["padding_rows"], {"aggregation_weights": lambda am, k: torch.ones_like(am) / am.numel()}, "rl", "weights",
            "mean over all B·T positions"),
        "temperature missing from learner log-probs": (["alpha_2", "all_on"], {
            "learner_log_probs": lambda z, a, e: orig["policy_log_probs"](z, 1.0, e)}, "rl", "logq",
            "without the inverse temperature"),
        "gate order swapped in the weights": (["base", "qvalue_f32"], {"load_lstm_state": _igfo}, "rl", "scores",
                                              "gate blocks taken as (i, g, f, o)"),
        "baseline not detached": (["base", "whiten_bessel"], {"compute_baseline": baseline_not_detached}, "rl",
                                  "grad/loss_pg/", "baseline is not detached"),
        "KL penalty not detached": (["base", "all_on", "total_gamma_0_9"], {"kl_estimate": kl_not_detached}, "rl",
                                    "grad/loss_pg/", "KL penalty is not detached"),
        "entropy detached": (["entropy_coef"], {"entropy": lambda lq: orig["entropy"](lq).detach()}, "rl",
                             "grad/loss_ent/", "must not be detached"),
    }


PLANTS = ["loss sign", "off-by-one returns", "reversed KL ratio k1", "reversed KL ratio k3", "whitening variance",
          "missing mask (mean over all positions)", "temperature missing from learner log-probs",
          "gate order swapped in the weights", "baseline not detached", "KL penalty not detached", "entropy detached"]


@pytest.mark.torch
@pytest.mark.parametrize("plant", PLANTS)
def test_planted_mistake_is_flagged_with_its_hint(tr, monkeypatch, plant):
    cases, patches, section, quantity, hint = _plants(tr)[plant]
    rep = _planted(tr, monkeypatch, cases, **patches)
    for c in rep.cases:
        f = c.first(section)
        assert f is not None, (plant, c.case, rep.format())
        assert f.quantity.startswith(quantity), (plant, c.case, f.format())
        assert hint in f.hint, (plant, c.case, f.format())


@pytest.mark.torch
def test_planted_gate_order_is_also_named_in_the_rollout(tr, monkeypatch):
    rep = _planted(tr, monkeypatch, ["eps_0_1"], load_lstm_state=_igfo)
    f = rep.cases[0].first("rollout")
    assert f.quantity.startswith("rollout/") and "gate blocks taken as (i, g, f, o)" in f.hint


@pytest.mark.torch
def test_planted_unmasked_logp_is_only_a_masking_finding(tr, monkeypatch):
    orig = tr.rl_objective

    def unmasked(*args, **kw):
        out = orig(*args, **kw)
        lq, tokens = out["logq"], args[2]
        out["logp"] = lq.gather(2, tokens[..., None])[..., 0]            # logp kept at prompt positions too
        return out
    rep = _planted(tr, monkeypatch, ["padding_rows"], rl_objective=unmasked)
    c = rep.cases[0]
    assert [f.kind for f in c.findings] == ["masking"] and c.findings[0].quantity == "logp"
    assert not c.ok and c.first() is None


@pytest.mark.torch
def test_planted_float32_load_in_a_float64_case(tr, monkeypatch):
    import torch

    def load_then_cast(net, arrays, prefix, dtype):                        # load into float32, then cast
        state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
        net.load_state_dict(state)
        return net.to(dtype)
    rep = _planted(tr, monkeypatch, ["base"], load_model=load_then_cast)
    f = rep.cases[0].first("rl")
    assert f.quantity == "scores" and "rounded to float32" in f.hint


# ============================================================================ every backend of rlhf_ref

def _backend_outputs(mod, e, a):
    """A backend's outputs for one case through the backend interface (docs/internals.md); the
    functions a backend does not implement (NotImplementedError) leave their quantities out."""
    from rlhf_ref import reinforce
    cfg = e["config"]
    rc = reinforce.ReinforceConfig(**{k: cfg[k] for k in reinforce.ReinforceConfig.__dataclass_fields__})
    split = lambda p: {k.split("/", 1)[1]: a[k] for k in e["inputs"] if k.startswith(p)}  # noqa: E731
    pol, ref = split("policy/"), split("ref/")
    o = {}

    def rollout():
        ro = mod.rollout(pol, a["rollout/prompt_tokens"], a["rollout/prompt_len"], a["rollout/u"], cfg["alpha"],
                         cfg["eps"], kind=cfg.get("policy_kind", "boltzmann"), eos_id=cfg["eos_id"])
        o.update({"rollout/" + k: ro[k] for k in ("tokens", "mask", "action_mask", "logp")})

    def rl():
        extra = {k: a[k] for k in ("group", "old_logp", "old_values") if k in e["inputs"]}
        out, g = mod.reinforce_loss_and_grad(pol, a["tokens"], a["mask"], a["prompt_len"], a["reward"], rc,
                                             ref_params=ref, **extra)
        # the interface's logq is the raw full distribution (the golden one is 0 off the position mask)
        o.update({k: v for k, v in out.items() if k in e["outputs"] and k != "logq"})
        o.update({f"grad/loss/policy/{k}": v for k, v in g.items()})

    def sft():
        out, g = mod.sft_loss_and_grad(pol, a["tokens"], a["mask"])
        o.update({"sft_logp": out["logp"], "sft_loss": out["loss"]})
        o.update({f"grad/sft_loss/policy/{k}": v for k, v in g.items()})

    def rm():
        out, g = mod.bt_loss_and_grad(split("rm/"), a["chosen"], a["chosen_mask"], a["rejected"], a["rejected_mask"])
        o.update({"reward_chosen": out["reward_chosen"], "reward_rejected": out["reward_rejected"],
                  "bt_loss": out["loss"]})
        o.update({f"grad/bt_loss/rm/{k}": v for k, v in g.items()})

    for section, run in (("rollout", rollout), ("rl", rl), ("sft", sft), ("rm", rm)):
        if section in e["sections"]:
            try:
                run()
            except NotImplementedError:
                pass
    return o


def _backend_params():
    from rlhf_ref import backends
    names = list(backends.available())
    # compiled backends compile on their first call (numba: ~40 s without its cache): CI runs them
    return [pytest.param(n, marks=() if n == "numpy" else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("backend", _backend_params())
def test_every_backend_passes_the_golden_vectors(golden, backend):
    """Each available backend of rlhf_ref, through the backend interface, passes every case."""
    from rlhf_ref import backends
    st = backends.available()[backend]
    if not st.available:
        pytest.skip(f"backend {backend} unavailable: {st.reason}")
    mod = backends.get(backend)
    outs = {n: _backend_outputs(mod, e, a) for n, (e, a) in golden.items()}
    rep = vf.verify(GOLDEN, outs)
    assert rep.ok, rep.format()


# ============================================================================ issue 9: every difference, related

def _kl_reversed_chain(golden, name="base", second=False):
    """KL with the ratio reversed, and everything downstream recomputed from it (the user's own
    consistent values); ``second``: the advantages' sign flipped as well (an independent mistake)."""
    from rlhf_ref import returns as ret
    e, a = golden[name]
    out = outputs(golden, name)
    am = a["action_mask"] > 0
    cfg = e["config"]
    kl = ret.kl_per_token(a["ref_logp"], a["logp"], am, cfg["kl"])
    r = ret.shaped_rewards(kl, a["reward"], am, cfg["beta"])
    G = ret.discounted_returns(r, am, cfg["gamma"], cfg["returns"])
    adv = np.where(am, G - a["values"], 0.0)
    if second:
        adv = -adv
    out.update(kl=kl, rewards=r, returns=G, advantages=adv, loss_pg=-np.sum(a["weights"] * adv * a["logp"]))
    out["loss"] = out["loss_pg"] + a["loss_ent"] + a["loss_value"]
    return out


def test_every_difference_is_reported_and_related_to_the_root(golden):
    rep = check(golden, "base", _kl_reversed_chain(golden))
    diff = rep.differing("rl")
    assert [f.quantity for f in diff[:6]] == ["kl", "rewards", "returns", "advantages", "loss_pg", "loss"], rep.format()
    assert diff[0].root and diff[0].mistake == "kl_k1_ratio_reversed"
    assert all(f.relation == "follows" for f in diff[1:6]), rep.format(verbose=True)
    assert diff[1].upstream == ("kl",) and diff[3].upstream == ("returns",)
    # the gradients of L_pg differ too (the golden ones were kept: they do not follow the user's values)
    assert all(f.relation == "downstream" for f in diff[6:])
    text = rep.format()
    assert text.count("hint:") == 1 and "follow from your values above" in text, text


def test_a_second_independent_mistake_is_named_from_the_users_upstream_values(golden):
    rep = check(golden, "base", _kl_reversed_chain(golden, second=True))
    adv = next(f for f in rep.differing("rl") if f.quantity == "advantages")
    assert adv.relation == "independent" and adv.mistake == "advantages_sign", adv.format()
    text = rep.format()
    assert "a second, independent mistake" in text and text.count("hint:") == 2, text
    loss_pg = next(f for f in rep.differing("rl") if f.quantity == "loss_pg")
    assert loss_pg.relation == "follows" and loss_pg.upstream == ("advantages",)


def test_a_later_difference_whose_inputs_match_is_independent(golden):
    """Two mistakes far apart: kl right, entropy in bits (independent of kl)."""
    e, a = golden["base"]
    out = outputs(golden, "base")
    out["kl"] = -out["kl"]                       # root, nothing recomputed downstream: rewards match golden
    out["loss_value"] = 2 * out["loss_value"]    # the value loss without its ½
    rep = check(golden, "base", out)
    lv = next(f for f in rep.differing("rl") if f.quantity == "loss_value")
    assert lv.relation == "independent" and lv.mistake == "loss_value_without_half", lv.format()


def test_rollout_masks_follow_from_the_tokens(golden):
    mod = _independent()
    e, a = golden["alpha_2"]
    out = outputs(golden, "alpha_2")
    out.update(mod.sample(a, e["config"], np.roll(a["rollout/u"].astype(np.float64), 1, axis=1)))
    rep = check(golden, "alpha_2", out)
    fs = {f.quantity: f for f in rep.differing("rollout")}
    assert fs["rollout/tokens"].mistake == "u_one_step_late", rep.format()
    assert fs["rollout/mask"].relation == "follows" and fs["rollout/action_mask"].relation == "follows"
    assert "rollout/logp" not in fs or fs["rollout/logp"].relation == "follows", rep.format(verbose=True)
    assert not any(f.kind == "masking" for f in rep.findings), rep.format()


def test_the_u_hint_needs_consistent_sampling_logprobs(golden):
    """Tokens drawn with u[:, t−1] but log-probs that are not those of the tokens drawn: no u hint."""
    mod = _independent()
    e, a = golden["alpha_2"]
    u = np.roll(a["rollout/u"].astype(np.float64), 1, axis=1)
    s = mod.sample(a, e["config"], u)
    for lp in (s["rollout/logp"] * 1.1, mod.sample(a, dict(e["config"], alpha=1.0), u)["rollout/logp"]):
        out = dict(outputs(golden, "alpha_2"), **s)
        out["rollout/logp"] = lp
        f = check(golden, "alpha_2", out).first("rollout")
        assert f.quantity == "rollout/tokens" and not f.mistake.startswith("u_"), f.format()


def test_default_report_has_one_not_checked_summary(golden):
    outs = {n: {k: v for k, v in outputs(golden, n).items() if k in ("logp", "kl")} for n in ("base", "kl_k2")}
    text = vf.verify(GOLDEN, outs).format()
    assert text.count("not checked") == 1 and "-v lists them" in text, text


def _independent():
    spec = importlib.util.spec_from_file_location("test_mistakes_impl", os.path.join(HERE, "test_mistakes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ============================================================================ issue 9: the public API

def test_verify_outputs_returns_a_report_for_a_dict_and_a_case_name(golden):
    out = outputs(golden, "base")
    for g in (None, GOLDEN):
        rep = vf.verify_outputs(out, "base", golden=g)
        assert isinstance(rep, vf.Report) and rep.ok and len(rep.case("base").checked) == len(out), rep.format()
    e, _ = golden["base"]
    bad = dict(out, kl=-out["kl"])
    rep = vf.verify_outputs(bad, e)              # a manifest entry works as the case
    assert not rep.ok and rep.case("base").first().mistake == "kl_k1_ratio_reversed"
    with pytest.raises(AssertionError, match=r"(?s)FAIL base.*kl: .*hint: KL matches k1"):
        assert rep.ok, rep.format()
    with pytest.raises(KeyError, match="case: no golden case named 'nope'"):
        vf.verify_outputs(out, "nope")
    with pytest.raises(TypeError, match="outputs must be a dict"):
        vf.verify_outputs([out], "base")


# ============================================================================ issue 9: layouts

def _to_response(a, pl, L):
    out = np.zeros((a.shape[0], L) + a.shape[2:], a.dtype)
    for b in range(a.shape[0]):
        k = min(L, a.shape[1] - pl[b])
        out[b, :k] = a[b, pl[b]:pl[b] + k]
    return out


def test_response_layout_is_accepted_when_declared(golden):
    e, a = golden["padding_rows"]
    L = int((a["action_mask"] > 0).sum(1).max()) + 1
    out = {}
    for k, v in outputs(golden, "padding_rows").items():
        if gv.time_aligned(k):
            pl = a["rollout/prompt_len" if k.startswith("rollout/") else "prompt_len"]
            v = _to_response(v, pl, L)
        out[k] = v
    rep = check(golden, "padding_rows", out, layout="response")
    assert rep.ok, rep.format()
    assert check(golden, "padding_rows", dict(out, layout=np.array("response"))).ok
    f = check(golden, "padding_rows", out).first("rl")      # undeclared: the shape says what to declare
    assert f.kind == "shape" and "--layout response" in f.message, f.format()
    # an index is reported in the response layout's coordinates, and says so
    kl = out["kl"].copy()
    b = int(np.nonzero((a["action_mask"] > 0).any(1))[0][0])
    kl[b, 1] += 1.0
    f = check(golden, "padding_rows", dict(out, kl=kl), layout="response").first("rl")
    t = int(a["prompt_len"][b]) + 1
    assert f.quantity == "kl" and f"[{b}, 1] (response layout; token-aligned [{b}, {t}])" in f.message, f.format()
    # anything past a row's response is accepted under a 0 of the user's own action_mask (same layout)
    junk = dict(out)
    am_r = out["action_mask"] > 0
    for k in ("logp", "kl", "advantages"):
        junk[k] = np.where(am_r, out[k], 7.0)
    assert check(golden, "padding_rows", junk, layout="response").ok
    f = check(golden, "padding_rows", dict(junk, action_mask=np.ones_like(out["action_mask"])), layout="response")
    assert not f.ok
    short = dict(out, kl=out["kl"][:, :L - 2])
    f = check(golden, "padding_rows", short, layout="response").first("rl")
    assert f.kind == "shape" and "L ≥" in f.message, f.format()


def test_shifted_layout_reports_shifted_coordinates(golden):
    out = {k: (v[:, 1:] if gv.time_aligned(k) else v) for k, v in outputs(golden, "base").items()}
    e, a = golden["base"]
    b, t = [int(i) for i in np.argwhere(a["action_mask"] > 0)[0]]
    out["kl"] = out["kl"].copy()
    out["kl"][b, t - 1] += 1.0
    f = check(golden, "base", out, layout="shifted").first("rl")
    assert f"[{b}, {t - 1}] (shifted layout; token-aligned [{b}, {t}])" in f.message, f.format()


# ============================================================================ issue 9: right diagnoses

def test_reward_one_position_after_the_last_action_is_named_not_padding(golden):
    e, a = golden["padding_rows"]
    out = outputs(golden, "padding_rows")
    am = a["action_mask"] > 0
    r = np.where(am, -e["config"]["beta"] * a["kl"], 0.0)
    for b in np.nonzero(am.any(1))[0]:
        t = int(np.nonzero(am[b])[0][-1]) + 1
        if t < am.shape[1]:
            r[b, t] += a["reward"][b]
    rep = check(golden, "padding_rows", dict(out, rewards=r))
    fs = [f for f in rep.findings if f.quantity == "rewards"]
    assert fs and all(f.mistake == "R_after_last_action" for f in fs), rep.format()
    assert "padding leaks" not in rep.format()


def test_loo_row_means_hint_names_the_cases_own_baseline(golden):
    e, a = golden["base"]
    G, am = a["returns"], a["action_mask"] > 0
    means = np.array([G[b, am[b]].mean() for b in range(G.shape[0])])
    bl = np.where(am, np.array([np.delete(means, b).mean() for b in range(G.shape[0])])[:, None], 0.0)
    f = check(golden, "base", dict(outputs(golden, "base"), baseline=bl)).first("rl")
    assert f.mistake == "baseline_loo_of_row_means", f.format()
    assert "'loo' here" not in f.hint and "'value'" in f.hint, f.hint


def test_whitening_clamp_is_a_candidate(golden):
    mod = _independent()
    e, a = golden["whiten_small_variance"]
    am = a["action_mask"] > 0
    A0 = np.where(am, a["returns"].astype(np.float64) - a["baseline"], 0.0)
    x = A0[am]
    assert np.mean((x - x.mean()) ** 2) < 1e-8          # the clamp differs from no eps on this case
    adv = mod.whitened(A0, am, "population", "clamp")
    f = check(golden, "whiten_small_variance", dict(outputs(golden, "whiten_small_variance"), advantages=adv)
              ).first("rl")
    assert f.mistake == "whiten_population_clamp" and "max(σ², 1e-8)" in f.hint, f.format()


def test_shift_candidates_match_real_off_by_one_implementations(golden):
    """A model read at h_t has a value at each row's last real token too (no 0 there); a double
    shift logq[:, t−1, tokens_t] is named."""
    mod = _independent()
    e, a = golden["base"]
    p = mod.P(e, a)
    for name, q in (("read_one_position_late", "scores"), ("logits_labels_off_by_one", "logp"),
                    ("labels_off_by_one", "logp"), ("logits_labels_shifted_twice", "logp")):
        planted = mod.PLANTS[name][2](p)
        last_real = (a["mask"].sum(1) - 1).astype(int)
        if q == "scores":
            assert all(np.any(planted[q][b, last_real[b]] != 0) for b in range(a["mask"].shape[0]))
        f = check(golden, "base", dict(outputs(golden, "base"), **planted)).first("rl")
        assert f.quantity == q and f.mistake == name, (name, f.format())


def test_every_later_difference_follows_when_the_user_is_consistent(golden):
    """On every case: an implementation whose only mistake is the KL estimator (k2 for k1, k1 for
    the others) and that computes everything downstream consistently from its own values: kl is
    the root, every later value difference follows from it (recomputed with the reference math
    from the user's values, under every switch of the table), gradients are downstream."""
    n_follow = 0
    for name, (e, a) in golden.items():
        if "rl" not in e["sections"] or e["config"]["beta"] == 0:
            continue
        cfg = dict(e["config"], kl="k2" if e["config"]["kl"] == "k1" else "k1")
        out = {k: v for k, v in gv.compute(gv.inputs_of(e, a), cfg, ["rl"]).items()}
        rep = check(golden, name, out)
        diff = rep.differing("rl")
        assert diff and diff[0].quantity == "kl" and diff[0].root, (name, rep.format())
        for f in diff[1:]:
            want = "downstream" if f.quantity.startswith("grad/") else "follows"
            assert f.relation == want, (name, f.format())
            n_follow += f.relation == "follows"
    assert n_follow > 100
