"""Golden vectors (rlhf_ref.vectors): reproducible files, the reference still produces the stored
values, every convention switch covered, the documented format holds.

The stored set is tests/golden (regenerate with ``rlhf-ref vectors --out tests/golden`` after a
deliberate change of the reference, and say why in the commit).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from argparse import Namespace

import numpy as np
import pytest

from _tol import assert_close
from rlhf_ref import conventions, model, policy, reinforce, returns as ret, vectors as gv

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def manifest():
    return gv.load_manifest(GOLDEN)


@pytest.fixture(scope="module")
def stored(manifest):
    return {e["name"]: (e, gv.load_case(manifest, e)) for e in manifest["cases"]}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    gv.write_vectors(str(out))
    return str(out)


# ------------------------------------------------------------------------------------ reproducible

def test_regenerating_gives_byte_identical_files(regenerated, tmp_path):
    """Two generations (here: a full one and a second run of some cases) write the same bytes."""
    names = ["base", "padding_rows", "all_on_f32"]
    gv.write_vectors(str(tmp_path), names)
    for n in names:
        with open(os.path.join(regenerated, n + ".npz"), "rb") as f1, open(tmp_path / (n + ".npz"), "rb") as f2:
            assert f1.read() == f2.read(), n


def _ulps(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind != "f":
        return 0 if np.array_equal(a, b) else np.inf
    sp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(a.dtype)).astype(np.float64)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)) / sp, initial=0.0))


def test_stored_files_equal_a_fresh_generation(regenerated, manifest):
    """tests/golden is exactly what the current code writes: same manifest, same bytes per case.
    A failure names the arrays that moved and by how many ulps (a changed reference, or a BLAS that
    rounds float64 dot products differently: see docs/golden-vectors.md, 'Reproducibility')."""
    with open(os.path.join(GOLDEN, gv.MANIFEST), "rb") as f1, open(os.path.join(regenerated, gv.MANIFEST), "rb") as f2:
        m1, m2 = f1.read(), f2.read()
    moved = []
    for e in manifest["cases"]:
        with open(os.path.join(GOLDEN, e["file"]), "rb") as f1, open(os.path.join(regenerated, e["file"]), "rb") as f2:
            b1, b2 = f1.read(), f2.read()
        if b1 != b2:
            z1, z2 = np.load(io.BytesIO(b1)), np.load(io.BytesIO(b2))
            diff = {k: _ulps(z1[k], z2[k]) for k in z1.files if k in z2.files and not np.array_equal(z1[k], z2[k])}
            moved.append((e["name"], diff or "different arrays"))
    assert not moved, f"stored golden vectors differ from a fresh generation: {moved[:5]}"
    assert m1 == m2, "manifest.json differs from a fresh generation"


def test_reference_reproduces_stored_values_exactly(stored):
    """From each file's stored inputs alone, the reference gives the stored outputs bit for bit
    (float64 computation, rounded once to the case dtype; integers equal)."""
    for name, (e, arrays) in stored.items():
        got = gv.compute(gv.inputs_of(e, arrays), e["config"], e["sections"])
        assert list(got) == e["outputs"], name
        for k in e["outputs"]:
            assert got[k].dtype == arrays[k].dtype, (name, k)
            assert np.array_equal(got[k], arrays[k]), f"{name}: {k} differs by {_ulps(got[k], arrays[k])} ulps"


def test_manifest_hashes_match_files(manifest):
    for e in manifest["cases"]:
        with open(os.path.join(GOLDEN, e["file"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == e["sha256"], e["name"]


def test_total_size_is_small():
    total = sum(os.path.getsize(os.path.join(GOLDEN, f)) for f in os.listdir(GOLDEN))
    assert total < 3_500_000, total          # 70 cases of ~43 kB (issue 9 doubled the cases)


# ------------------------------------------------------------------------------------ the format

def test_npz_is_plain_zip_of_npy_without_pickle(manifest):
    for e in manifest["cases"]:
        path = os.path.join(GOLDEN, e["file"])
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            assert [i.filename for i in infos] == [n + ".npy" for n in e["inputs"] + e["outputs"]]
            for i in infos:
                assert i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_STORED
                head = zf.read(i.filename)[:6]
                assert head == b"\x93NUMPY"
        with np.load(path, allow_pickle=False) as z:         # no object arrays anywhere
            for k in z.files:
                assert z[k].dtype.kind in "iuf", (e["name"], k, z[k].dtype)


def test_manifest_schema_and_config(manifest):
    assert manifest["schema"] == gv.SCHEMA and manifest["schema_version"] == gv.SCHEMA_VERSION
    assert manifest["conventions"]["gate_order"] == ["i", "f", "g", "o"]
    fields = set(reinforce.ReinforceConfig.__dataclass_fields__)
    names = [e["name"] for e in manifest["cases"]]
    assert len(set(names)) == len(names)
    for e in manifest["cases"]:
        cfg = e["config"]
        assert fields <= set(cfg), e["name"]
        assert cfg["layout"] == "token-aligned" and cfg["dtype"] in ("float32", "float64")
        assert cfg["whiten_eps"] == ret.WHITEN_EPS and cfg["policy_kind"] in conventions.values("policy")
        reinforce.ReinforceConfig(**{k: cfg[k] for k in fields})          # valid
        for k, v in e["switches"].items():
            assert cfg[k] == v
        for n in e["inputs"] + e["outputs"]:
            gv.quantity_of(n)                                            # every name documented


def test_outputs_follow_data_flow_order(manifest):
    order = ["rollout/tokens", "rollout/mask", "rollout/action_mask", "rollout/logp", "action_mask", "scores", "logq",
             "logp", "ref_logp", "entropy", "kl", "rewards", "returns", "values|qvalues", "baseline", "advantages",
             "ratio", "weights", "loss_pg", "loss_ent", "loss_value", "loss_kl", "loss", "grad/loss_pg",
             "grad/loss_ent", "grad/loss_value", "grad/loss_kl", "grad/loss/", "sft_logp", "sft_loss", "grad/sft_loss", "reward_chosen",
             "reward_rejected", "bt_loss", "grad/bt_loss"]

    def rank(n):
        for i, k in enumerate(order):
            if any(n == x or (x.startswith("grad/") and n.startswith(x)) for x in k.split("|")):
                return i
        raise AssertionError(n)
    for e in manifest["cases"]:
        ranks = [rank(n) for n in e["outputs"]]
        assert ranks == sorted(ranks), e["name"]


def test_float_arrays_have_the_case_dtype(stored):
    for name, (e, arrays) in stored.items():
        dt = np.dtype(e["config"]["dtype"])
        for k, a in arrays.items():
            assert a.dtype == dt if a.dtype.kind == "f" else a.dtype == np.int64, (name, k, a.dtype)


def test_masked_entries_are_exactly_zero(stored):
    for name, (e, a) in stored.items():
        for k in e["outputs"]:
            z = gv.zero_off(k)
            if z is None:
                continue
            on = model.position_mask(a["mask"]) > 0 if z == "position" else a[z] > 0
            off = ~on
            while off.ndim < a[k].ndim:
                off = off[..., None]
            assert np.all(np.where(np.broadcast_to(off, a[k].shape), a[k], 0) == 0), (name, k)


def test_gradients_of_every_parameter_and_term(stored):
    for name, (e, a) in stored.items():
        params = [k.split("/", 1)[1] for k in e["inputs"] if k.startswith("policy/")]
        if "rl" in e["sections"]:
            for loss in ("loss_pg", "loss_ent", "loss_value", "loss"):
                for p in params:
                    assert f"grad/{loss}/policy/{p}" in a
            # the total's gradient is the sum of the terms' (to rounding); loss_kl only with kl_in="loss"
            terms = ("loss_pg", "loss_ent", "loss_value") + (("loss_kl",) if e["config"]["kl_in"] == "loss" else ())
            assert ("loss_kl" in e["outputs"]) == (e["config"]["kl_in"] == "loss"), name
            assert ("ratio" in e["outputs"]) == (e["config"]["surrogate"] == "ppo_clip"), name
            for p in params:
                s = sum(a[f"grad/{t}/policy/{p}"].astype(np.float64) for t in terms)
                assert_close(a[f"grad/loss/policy/{p}"], s, dtype=a[f"grad/loss/policy/{p}"].dtype, n=4,
                             name=f"{name} {p}")


# ------------------------------------------------------------------------------------ coverage

def test_every_convention_switch_is_covered(manifest):
    cfgs = [e["config"] for e in manifest["cases"]]
    for key, values in (("kl", ret.KL_ESTIMATORS), ("returns", ret.RETURNS), ("baseline", ret.BASELINES),
                        ("whiten", ret.WHITEN), ("aggregation", reinforce.AGGREGATIONS), ("shift_mean", (True, False)),
                        ("dtype", ("float32", "float64"))):
        assert {c[key] for c in cfgs} >= set(values), key
    assert any(c["alpha"] > 1 for c in cfgs) and any(c["alpha"] < 1 for c in cfgs)
    assert any(c["alpha"] >= 20 for c in cfgs)                      # very peaked
    assert any(c["eps"] > 0 for c in cfgs) and any(c["gamma"] < 1 for c in cfgs)
    assert any(c["beta"] == 0 for c in cfgs) and any(c["entropy_coef"] > 0 for c in cfgs)
    assert any(c["value_coef"] != 0.5 for c in cfgs)
    # issue 9: every value of the new choices, and the interactions of i9-spec / the field's defaults
    for key in ("kl_in", "group_scale", "surrogate"):
        assert {c[key] for c in cfgs} == set(conventions.values(key)), key
    assert {c["kl"] for c in cfgs if c["kl_in"] == "loss" and c["beta"] > 0} == set(ret.KL_ESTIMATORS)
    assert {c["lam"] for c in cfgs if c["returns"] == "gae"} >= {0.0, 0.95, 1.0}
    assert {c["policy_kind"] for c in cfgs} == set(conventions.values("policy"))
    assert any(c["value_clip"] > 0 for c in cfgs) and any(c["clip_high"] != c["clip_low"] for c in cfgs)
    assert any(c["aggregation"] == "fixed_len" and c["norm_len"] > 0 for c in cfgs)
    names = {e["name"] for e in manifest["cases"]}
    assert {"grpo", "rloo", "dr_grpo", "ppo", "trl_grpo", "trl_rloo", "trl_ppo", "openrlhf_ppo",
            "openrlhf_grpo"} <= names
    # interactions
    assert any(c["returns"] == "total" and c["gamma"] < 1 for c in cfgs)
    assert any(c["baseline"] == "qvalue" and c["eps"] > 0 for c in cfgs)
    assert any(c["whiten"] != "off" and c["baseline"] in ("none", "loo") for c in cfgs)
    edges = {e["edge"] for e in manifest["cases"]}
    assert {"single_token", "padding_rows", "small_variance", "off_policy", "ratio_one"} <= edges
    sections = {s for e in manifest["cases"] for s in e["sections"]}
    assert sections == {"rollout", "rl", "sft", "rm"}


def test_edge_cases_hold_what_they_say(stored):
    e, a = stored["single_token"]
    assert np.all(a["action_mask"].sum(axis=1) == 1)
    e, a = stored["padding_rows"]
    B0 = e["dims"]["B_rollout"]
    assert a["mask"][B0].sum() == 0 and a["prompt_len"][B0] == 0                # all padding
    assert a["mask"][B0 + 1].sum() == a["prompt_len"][B0 + 1] == 3              # a prompt only
    assert a["tokens"].shape[1] == e["dims"]["T_rollout"] + 2                    # extra padding columns
    assert np.any(a["tokens"][a["mask"] == 0] != 0)                             # arbitrary ids at padding
    for k in ("logp", "kl", "rewards", "returns", "advantages", "weights"):
        assert np.all(a[k][B0:] == 0), k
    assert a["reward"][B0] != 0 and a["reward"][B0 + 1] != 0                    # ignored: no action
    e, a = stored["peaked"]
    assert e["config"]["alpha"] == 20 and np.min(a["entropy"][a["action_mask"] > 0]) < 1e-2
    assert np.min(a["logq"]) < -30                                              # log-probs far below 0
    e, a = stored["whiten_small_variance"]
    A0 = (a["returns"] - a["baseline"])[a["action_mask"] > 0]
    assert 1e-10 < A0.var() < 1e-7
    # issue 9: clipping active on both sides with a perturbed old_logp; the clipped value branch taken;
    # ratio exactly 1 where old_logp = logp; group rows share a prompt; the decoding cases decode
    for name in ("ppo_clip", "ppo", "grpo"):
        e, a = stored[name]
        am, A, r, c = a["action_mask"] > 0, a["advantages"], a["ratio"], e["config"]
        assert np.any(am & (A > 0) & (r > 1 + c["clip_high"])) and np.any(am & (A < 0) & (r < 1 - c["clip_low"])), name
    for name in ("value_clip", "ppo"):
        e, a = stored[name]
        c, G, v, ov = e["config"]["value_clip"], a["returns"], a["values"], a["old_values"]
        assert np.any((a["action_mask"] > 0) & ((ov + np.clip(v - ov, -c, c) - G) ** 2 > (v - G) ** 2)), name
    e, a = stored["ppo_clip_ratio_one"]
    assert np.array_equal(a["ratio"], a["action_mask"].astype(a["ratio"].dtype))
    for name, (e, a) in stored.items():
        if "group" in a:
            g = a["group"][:e["dims"].get("B_rollout", e["dims"]["B"])]
            for i in range(0, len(g), 2):
                assert g[i] == g[i + 1] and np.array_equal(a["rollout/prompt_tokens"][i], a["rollout/prompt_tokens"][i + 1])
    e, a = stored["decode_greedy"]
    assert np.all(a["rollout/logp"] == 0)                                     # argmax: probability 1
    e, a = stored["decode_eps_greedy"]
    lp = a["rollout/logp"][a["rollout/action_mask"] > 0]
    assert np.allclose(np.unique(np.round(lp, 6)), np.round(np.log([0.1 / 7, 0.9 + 0.1 / 7]), 6))


def test_padding_rows_and_columns_change_nothing(stored):
    """docs/conventions.md §2: the padding_rows case, stripped of its extra rows and columns, gives the same
    numbers (each row's values, the losses and the gradients)."""
    e, a = stored["padding_rows"]
    B0, T0 = e["dims"]["B_rollout"], e["dims"]["T_rollout"]
    cfg = reinforce.ReinforceConfig(**{k: e["config"][k] for k in reinforce.ReinforceConfig.__dataclass_fields__})
    pol = {k.split("/", 1)[1]: a[k] for k in e["inputs"] if k.startswith("policy/")}
    ref = {k.split("/", 1)[1]: a[k] for k in e["inputs"] if k.startswith("ref/")}
    tok = np.where(a["mask"][:B0, :T0] > 0, a["tokens"][:B0, :T0], 0)
    o, g = reinforce.loss_and_grad(pol, tok, a["mask"][:B0, :T0], a["prompt_len"][:B0], a["reward"][:B0], cfg,
                                   ref_params=ref)
    for k in ("logp", "kl", "rewards", "returns", "advantages"):
        assert_close(a[k][:B0, :T0], o[k], n=64, name=k)
    for k in ("loss_pg", "loss_ent", "loss_value", "loss"):
        assert_close(a[k], o[k], n=64, name=k)
    for p in pol:
        assert_close(a[f"grad/loss/policy/{p}"], g[p], n=256, name=p)


def test_used_uniforms_keep_away_from_cdf_boundaries(stored):
    for name, (e, a) in stored.items():
        if "rollout" not in e["sections"]:
            continue
        pol = {k.split("/", 1)[1]: a[k].astype(np.float64) for k in e["inputs"] if k.startswith("policy/")}
        fwd, _ = model.forward(pol, a["rollout/tokens"], a["rollout/mask"])
        cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], e["config"]["alpha"], e["config"]["eps"],
                                               e["config"]["policy_kind"])), -1)
        d = np.min(np.abs(a["rollout/u"].astype(np.float64)[:, :, None] - cdf), -1)
        assert np.all(d[a["rollout/action_mask"] > 0] >= gv.U_MARGIN / 2), name


def test_rl_batch_comes_from_the_rollout(stored):
    e, a = stored["base"]
    assert np.array_equal(a["tokens"], a["rollout/tokens"]) and np.array_equal(a["mask"], a["rollout/mask"])


# ------------------------------------------------------------------------------------ errors and CLI

def test_load_errors_name_the_file(tmp_path, manifest):
    with pytest.raises(gv.GoldenError, match="no golden-vector manifest"):
        gv.load_manifest(str(tmp_path))
    gv.write_vectors(str(tmp_path), ["base"])
    m = gv.load_manifest(str(tmp_path))
    with open(tmp_path / "base.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(gv.GoldenError, match="sha256"):
        gv.load_case(m, m["cases"][0])
    with open(tmp_path / gv.MANIFEST, "w") as f:
        json.dump({"schema": gv.SCHEMA, "schema_version": 99}, f)
    with pytest.raises(gv.GoldenError, match="schema_version"):
        gv.load_manifest(str(tmp_path))


def test_cli_vectors_writes_and_lists(tmp_path, capsys):
    assert gv.main(Namespace(out=str(tmp_path), cases=["base", "kl_k3"], list=False, quiet=False)) == 0
    assert sorted(os.listdir(tmp_path)) == ["base.npz", "kl_k3.npz", "manifest.json"]
    assert "wrote 2 cases" in capsys.readouterr().out
    assert gv.main(Namespace(out=str(tmp_path), cases=None, list=True, quiet=False)) == 0
    assert "whiten_small_variance" in capsys.readouterr().out
    assert gv.main(Namespace(out=str(tmp_path), cases=["nope"], list=False, quiet=True)) == 2


def test_cli_vectors_through_rlhf_ref_command(tmp_path):
    """`rlhf-ref vectors` through the command table."""
    from rlhf_ref import cli
    assert cli.main(["vectors", "--out", str(tmp_path), "--case", "base", "-q"]) == 0
    assert os.path.exists(tmp_path / "base.npz")


def test_doc_case_table_is_the_rendering_of_cases():
    """docs/golden-vectors.md §5 holds exactly case_table_markdown() between its markers."""
    doc = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "golden-vectors.md"), encoding="utf-8").read()
    begin = doc.index("<!-- case table: generated by")
    begin = doc.index("\n", begin) + 1
    end = doc.index("<!-- end of the case table -->")
    assert doc[begin:end] == gv.case_table_markdown()
    for c in gv.CASES:
        assert f"| `{c.name}` | {c.dtype} |" in doc[begin:end]


def test_cli_vectors_max_file_mb(tmp_path, capsys):
    args = Namespace(out=str(tmp_path), cases=["base"], list=False, quiet=True, max_file_mb=-1.0)
    assert gv.main(args) == 2
    assert "--max-file-mb: must be a positive number" in capsys.readouterr().err
    assert gv.main(Namespace(**{**vars(args), "max_file_mb": 8.0})) == 0


# ------------------------------------------------------------------------------------ every backend

def _backend_outputs(mod, e, a):
    """One case's outputs by a backend, through the backend interface, with every input the case has
    (group, old_logp, old_values; the rollout's decoding policy)."""
    cfg = e["config"]
    rc = reinforce.ReinforceConfig(**{k: cfg[k] for k in reinforce.ReinforceConfig.__dataclass_fields__})
    split = lambda p: {k.split("/", 1)[1]: a[k] for k in e["inputs"] if k.startswith(p)}  # noqa: E731
    pol, ref = split("policy/"), split("ref/")
    o = {}
    if "rollout" in e["sections"]:
        ro = mod.rollout(pol, a["rollout/prompt_tokens"], a["rollout/prompt_len"], a["rollout/u"], cfg["alpha"],
                         cfg["eps"], kind=cfg["policy_kind"], eos_id=cfg["eos_id"])
        o.update({"rollout/" + k: ro[k] for k in ("tokens", "mask", "action_mask", "logp")})
    if "rl" in e["sections"]:
        extra = {k: a[k] for k in ("group", "old_logp", "old_values") if k in a}
        out, g = mod.reinforce_loss_and_grad(pol, a["tokens"], a["mask"], a["prompt_len"], a["reward"], rc,
                                             ref_params=ref, **extra)
        o.update({k: v for k, v in out.items() if k in e["outputs"] and k != "logq"})
        o.update({f"grad/loss/policy/{k}": v for k, v in g.items()})
    if "sft" in e["sections"]:
        out, g = mod.sft_loss_and_grad(pol, a["tokens"], a["mask"])
        o.update({"sft_logp": out["logp"], "sft_loss": out["loss"]})
        o.update({f"grad/sft_loss/policy/{k}": v for k, v in g.items()})
    if "rm" in e["sections"]:
        out, g = mod.bt_loss_and_grad(split("rm/"), a["chosen"], a["chosen_mask"], a["rejected"], a["rejected_mask"])
        o.update({"reward_chosen": out["reward_chosen"], "reward_rejected": out["reward_rejected"],
                  "bt_loss": out["loss"]})
        o.update({f"grad/bt_loss/rm/{k}": v for k, v in g.items()})
    return o


@pytest.mark.parametrize("backend", ["numpy", "cython", pytest.param("numba", marks=pytest.mark.slow)])
def test_every_training_backend_passes_every_case(stored, backend):
    """numpy, cython and numba (numba compiles for ~40 s on its first call: --runslow) pass every
    golden case through the backend interface, the issue-9 inputs included."""
    from rlhf_ref import backends
    from rlhf_ref.golden import verify as vf
    st = backends.available()[backend]
    if not st.available:
        pytest.skip(f"backend {backend} unavailable: {st.reason}")
    mod = backends.get(backend)
    outs = {n: _backend_outputs(mod, e, a) for n, (e, a) in stored.items()}
    rep = vf.verify(GOLDEN, outs)
    assert rep.ok, rep.format()


def test_cli_vectors_set_builds_a_case_of_any_configuration(tmp_path, capsys):
    """`rlhf-ref vectors --out DIR --set k=v ...`: one case, typed and checked by the table, written with
    its sha256 and manifest like the shipped ones; the reference reproduces it; bad values name the switch."""
    from rlhf_ref import cli
    out = tmp_path / "c"
    assert cli.main(["vectors", "--out", str(out), "--set", "baseline=group_loo", "--set", "group_scale=std",
                     "--set", "kl_in=loss", "--set", "kl=k3", "--set", "beta=0.04", "--set", "surrogate=ppo_clip",
                     "--set", "shift_mean=false", "--set", "policy=eps_greedy", "--set", "eps=0.1",
                     "--edge", "off_policy", "--name", "my_grpo", "-q"]) == 0
    man = gv.load_manifest(out)
    (e,) = man["cases"]
    assert e["name"] == "my_grpo" and e["file"] == "my_grpo.npz"
    assert e["switches"] == {"eps": 0.1, "beta": 0.04, "kl": "k3", "baseline": "group_loo", "shift_mean": False,
                             "kl_in": "loss", "group_scale": "std", "surrogate": "ppo_clip"}
    assert e["config"]["policy_kind"] == "eps_greedy" and e["edge"] == "off_policy"
    a = gv.load_case(man, e)                                                  # sha256 checked
    assert {"group", "old_logp"} <= set(e["inputs"]) and {"ratio", "loss_kl"} <= set(e["outputs"])
    got = gv.compute(gv.inputs_of(e, a), e["config"], e["sections"])
    assert all(np.array_equal(got[k], a[k]) for k in e["outputs"])
    # the default name, float32
    assert cli.main(["vectors", "--out", str(tmp_path / "d"), "--set", "aggregation=fixed_len", "--dtype", "float32",
                     "-q"]) == 0
    (e,) = gv.load_manifest(tmp_path / "d")["cases"]
    assert e["name"] == "custom" and e["config"]["dtype"] == "float32"
    capsys.readouterr()
    for bad, msg in ((["--set", "lam=2"], "lam must be <= 1.0"),
                     (["--set", "returns=gae", "--set", "baseline=mean"], "returns='gae' needs baseline='value'"),
                     (["--set", "surrogate=ppo"], "surrogate must be one of"),
                     (["--set", "nope=1"], "expected name=value with name one of"),
                     (["--set", "policy=sampled"], "policy must be one of"),
                     (["--set", "gamma=0.5", "--name", "bad-name"], "--name must be letters"),
                     (["--set", "gamma=0.5", "--case", "base"], "--case and --set/--name exclude each other")):
        assert cli.main(["vectors", "--out", str(tmp_path / "e"), *bad, "-q"]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    assert not os.path.exists(tmp_path / "e")
