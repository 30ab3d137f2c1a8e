"""The demo end to end (``--quick``), through the command line, and the commands around it:
its run folder, summary and metrics, resuming a finished run, ``rlhf-ref sample`` and the
``train-*`` commands, and clear errors for bad arguments and bad checkpoints."""

import io
import json
import math
import os
import shutil

import numpy as np
import pytest

from rlhf_ref import cli, demo
from rlhf_ref.metrics import read_metrics
from rlhf_ref.pipeline import common

SUMMARY_KEYS = ("rm_heldout_accuracy", "true_win_rate", "true_reward_before", "true_reward_after",
                "kl_per_sequence", "seconds", "backend", "seed", "ref_loglik_per_token_before",
                "ref_loglik_per_token_after", "wellformed_rate_before", "wellformed_rate_after",
                "corpus_word_rate_after", "n_eval_prompts", "stage_seconds", "configs")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo through the CLI, shared by the tests below: (run folder, printed output)."""
    out = str(tmp_path_factory.mktemp("demo") / "run")
    buf = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["demo", "--quick", "--out", out, "--backend", "numpy", "--seed", "3"])
    assert code == 0
    return out, buf.getvalue()


def test_quick_demo_writes_its_run_folder(quick_run):
    out, text = quick_run
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert s["backend"] == "numpy" and s["seed"] == 3 and s["quick"] is True
    assert s["n_eval_prompts"] >= 200
    for k in ("rm_heldout_accuracy", "true_win_rate", "wellformed_rate_after", "corpus_word_rate_after"):
        assert 0.0 <= s[k] <= 1.0, k
    for k in ("true_reward_before", "true_reward_after", "kl_per_sequence", "ref_loglik_per_token_after", "seconds"):
        assert isinstance(s[k], float) and math.isfinite(s[k]), k
    assert s["ref_loglik_per_token_before"] < 0
    # the printed story: every stage, samples before/after, the table and the folder
    for needle in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "samples", "→", "true win rate",
                   "KL(π‖π_ref) per sequence", out):
        assert needle in text, needle
    for name in ("preferences.jsonl", "samples.jsonl", "metrics/pretrain.jsonl", "metrics/reward.jsonl",
                 "metrics/rl.jsonl"):
        assert os.path.exists(os.path.join(out, name)), name
    for stage in ("pretrain", "reward", "rl"):
        assert len(common.stage_checkpoints(out, stage)) == 1
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(ln) for ln in f]
    assert len(samples) == s["n_eval_prompts"] and set(samples[0]) >= {"prompt", "before", "after"}


def test_quick_demo_metrics_are_valid(quick_run):
    out, _ = quick_run
    cfgs = json.load(open(os.path.join(out, "summary.json")))["configs"]
    for stage, key in (("pretrain", "pretrain"), ("reward", "reward"), ("rl", "rl")):
        rows = read_metrics(os.path.join(out, "metrics", f"{stage}.jsonl"))
        assert [r["step"] for r in rows] == list(range(1, cfgs[key]["steps"] + 1))
        assert all(r["stage"] == stage and math.isfinite(r["loss"]) for r in rows)
    rl = read_metrics(os.path.join(out, "metrics", "rl.jsonl"))
    assert all(k in rl[0] for k in ("rm_reward", "true_reward", "kl_per_sequence", "entropy", "tokens_per_s"))


def test_rerun_resumes_finished_stages_with_the_same_numbers(quick_run, tmp_path):
    out, _ = quick_run
    from rlhf_ref.demo import run_demo
    copy = str(tmp_path / "again")
    shutil.copytree(out, copy)
    first = json.load(open(os.path.join(out, "summary.json")))
    buf = io.StringIO()
    s = run_demo(out=copy, seed=3, backend="numpy", quick=True, progress="off", stream=buf)
    assert buf.getvalue().count("finished checkpoint found") == 3
    assert "Loaded" in buf.getvalue()                      # the preference file is reused
    for k in ("rm_heldout_accuracy", "true_win_rate", "true_reward_before", "true_reward_after",
              "kl_per_sequence", "ref_loglik_per_token_after"):
        assert s[k] == first[k], k


def test_sample_command(quick_run, capsys):
    out, _ = quick_run
    assert cli.main(["sample", "--checkpoint", out, "--prompt", "the cat ", "--n", "3", "--seed", "1",
                     "--backend", "numpy", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(r["prompt"] == "the cat " for r in rows)
    # the same seed gives the same text; a checkpoint file works as well as the folder
    stem = common.stage_checkpoints(out, "rl")[0]
    assert cli.main(["sample", "--checkpoint", stem + ".npz", "--prompt", "the cat ", "--n", "3", "--seed", "1",
                     "--backend", "numpy", "--json"]) == 0
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] == rows
    assert cli.main(["sample", "--checkpoint", out, "--n", "2", "--kind", "greedy", "--max-len", "5",
                     "--backend", "numpy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# rl step") and len(lines) == 3


def test_sample_pairs_for_the_labeler(quick_run, tmp_path, capsys):
    out, _ = quick_run
    cands = str(tmp_path / "cands.jsonl")
    assert cli.main(["sample", "--checkpoint", out, "--pairs", "6", "--out", cands, "--backend", "numpy"]) == 0
    from rlhf_ref.label import load_candidates
    got = load_candidates(cands)
    assert 1 <= len(got) <= 6 and all(c.is_pair for c in got)


def test_train_commands_on_human_style_preferences(quick_run, tmp_path, capsys):
    """train-rm on a preference file, then train-rl, in a run folder seeded with a pretrained policy."""
    out, _ = quick_run
    run = tmp_path / "mine"
    os.makedirs(run / "checkpoints")
    for ext in (".npz", ".json"):
        shutil.copy(common.stage_checkpoints(out, "pretrain")[0] + ext, run / "checkpoints")
    prefs = os.path.join(out, "preferences.jsonl")
    assert cli.main(["train-rm", "--out", str(run), "--preferences", prefs, "--backend", "numpy", "--set", "steps=3",
                     "--set", "eval_every=0", "--progress", "off"]) == 0
    assert cli.main(["train-rl", "--out", str(run), "--backend", "numpy", "--set", "steps=2", "--set", "batch_size=4",
                     "--set", "norm_samples=8", "--set", "whiten=population", "--set", "shift_mean=false",
                     "--progress", "off"]) == 0
    assert len(common.stage_checkpoints(str(run), "rl")) == 1
    # every switch of the conventions table reached the stage (shift_mean was once lost by RLConfig)
    ck = common.load_stage(common.stage_checkpoints(str(run), "rl")[0], "rl")
    assert ck["config"]["shift_mean"] is False and ck["config"]["whiten"] == "population"
    capsys.readouterr()


@pytest.mark.parametrize("sets", [["group_size=4", "baseline=group_loo"],
                                  ["surrogate=ppo_clip", "ppo_epochs=2", "value_clip=0.2"],
                                  ["group_size=2", "baseline=group_mean", "group_scale=std", "kl_in=loss", "kl=k3"],
                                  ["baseline=qvalue"]], ids=["rloo", "ppo", "grpo", "qvalue"])
def test_train_rl_with_the_field_conventions(quick_run, tmp_path, capsys, sets):
    """rlhf-ref train-rl --set NAME=VALUE ... (several after one --set) for every issue-9 setting."""
    out, _ = quick_run
    run = tmp_path / "field"
    os.makedirs(run / "checkpoints")
    for stage in ("pretrain", "reward"):
        for ext in (".npz", ".json"):
            shutil.copy(common.stage_checkpoints(out, stage)[0] + ext, run / "checkpoints")
    assert cli.main(["train-rl", "--out", str(run), "--backend", "numpy", "--set", "steps=2", "batch_size=3",
                     "norm_samples=8", "max_new=8", "--set", *sets, "--progress", "off"]) == 0, capsys.readouterr().err
    ck = common.load_stage(common.stage_checkpoints(str(run), "rl")[0], "rl")
    for s in sets:
        name, value = s.split("=")
        assert str(ck["config"][name]) == value
    rows = read_metrics(run / "metrics" / "rl.jsonl")
    assert len(rows) == 2 and all("loss_kl" in r for r in rows)
    assert ("qvalue.weight" in ck["groups"]["policy"]) == ("baseline=qvalue" in sets)
    capsys.readouterr()


def test_demo_passes_set_to_the_rl_stage(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert cli.main(["demo", "--quick", "--set", "group_size=4", "baseline=group_loo", "--threads", "0"]) == 0
    lc = seen["configs"][2]
    assert lc.group_size == 4 and lc.baseline == "group_loo" and lc.steps == demo.stage_configs(quick=True)[2].steps


@pytest.mark.parametrize("argv, message", [
    (["demo", "--quick", "--set", "baseline=group_loo"], "needs group_size >= 2"),
    (["demo", "--quick", "--set", "ppo_epochs=0"], "ppo_epochs must be an integer >= 1"),
    (["train-rl", "--out", "{run}", "--set", "baseline=group_mean"], "needs group_size >= 2"),
    (["demo", "--quick", "--backend", "nope"], "unknown backend 'nope'"),
    (["demo", "--quick", "--threads", "-1"], "--threads must be >= 0"),
    (["sample", "--checkpoint", "{run}", "--alpha", "0"], "alpha must be > 0"),
    (["sample", "--checkpoint", "{run}", "--prompt", "THE"], "character 'T' at position 0"),
    (["sample", "--checkpoint", "{run}", "--n", "0"], "--n must be >= 1"),
    (["sample", "--checkpoint", "{run}", "--pairs", "3"], "--pairs N and --out FILE go together"),
    (["sample", "--checkpoint", "{missing}"], "not found"),
    (["train-rm", "--out", "{empty}", "--preferences", "{prefs}"], "has no pretrain checkpoint"),
    (["train-rm", "--out", "{run}", "--preferences", "{prefs}", "--set", "lr=fast"], "lr must be a float"),
    (["train-rm", "--out", "{run}", "--preferences", "{prefs}", "--set", "nope=1"], "expected name=value"),
    (["train-rl", "--out", "{run}", "--set", "beta=-1"], "beta must be >= 0"),
    (["train-rl", "--out", "{run}", "--set", "shift_mean=maybe"], "shift_mean must be a bool"),
    (["train-rl", "--out", "{run}", "--set", "kl=k9"], "kl must be one of ['k1', 'k2', 'k3'], got 'k9'"),
])
def test_bad_arguments_give_clear_errors(quick_run, tmp_path, capsys, argv, message):
    out, _ = quick_run
    sub = {"{run}": out, "{missing}": str(tmp_path / "nothing.npz"), "{empty}": str(tmp_path / "empty"),
           "{prefs}": os.path.join(out, "preferences.jsonl")}
    argv = [sub.get(a, a) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"rlhf-ref {argv[0]}: error:") and message in err, err
    assert "Traceback" not in err


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--dtype", "float16"])
    assert e.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def _corrupt(kind, stem):
    if kind == "truncated":
        with open(stem + ".npz", "rb") as f:
            data = f.read()
        with open(stem + ".npz", "wb") as f:
            f.write(data[:100])
    elif kind == "schema":
        man = json.load(open(stem + ".json"))
        man["schema_version"] = 2
        json.dump(man, open(stem + ".json", "w"))
    elif kind == "pickle":
        # a pickled object array inside, with a manifest that matches it byte for byte
        import hashlib
        buf = io.BytesIO()
        np.savez(buf, **{"policy/head.bias": np.array([{"evil": 1}], dtype=object)}, allow_pickle=True)
        data = buf.getvalue()
        with open(stem + ".npz", "wb") as f:
            f.write(data)
        man = json.load(open(stem + ".json"))
        man["sha256"] = hashlib.sha256(data).hexdigest()
        man["arrays"] = {"policy/head.bias": {"shape": [1], "dtype": "|O"}}
        json.dump(man, open(stem + ".json", "w"))
    elif kind == "no-manifest":
        os.unlink(stem + ".json")


@pytest.mark.parametrize("kind, message", [("truncated", "do not match manifest"),
                                           ("schema", "schema_version 2"),
                                           ("pickle", "pickle"),
                                           ("no-manifest", "not found")])
def test_bad_checkpoints_give_clear_errors(quick_run, tmp_path, capsys, kind, message):
    out, _ = quick_run
    stem = common.stage_checkpoints(out, "rl")[0]
    bad = str(tmp_path / "bad")
    for ext in (".npz", ".json"):
        shutil.copy(stem + ext, bad + ext)
    _corrupt(kind, bad)
    assert cli.main(["sample", "--checkpoint", bad + ".npz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ref sample: error:") and message in err and "bad." in err, err
