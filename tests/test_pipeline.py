"""The training pipeline: every stage resumes to the same result as an uninterrupted run, metrics
files are valid, checkpoints are crash-safe, and bad inputs give clear errors.

Tiny models (H ≤ 16) on the embedded corpus, the numpy backend; a "crash" is an exception raised
from inside the backend in the middle of a stage, exactly where a killed process would stop.
"""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from rlhf_ref import backends
from rlhf_ref.data import corpus
from rlhf_ref.io import CheckpointError
from rlhf_ref.metrics import MetricsLogger, Progress, read_metrics
from rlhf_ref.pipeline import common
from rlhf_ref.pipeline.pretrain import PretrainConfig, pretrain
from rlhf_ref.pipeline.reward import RewardConfig, collect_preferences, split_pairs, train_reward_model
from rlhf_ref.pipeline.rl import RLConfig, reinforce_finetune

NUMPY = backends.get("numpy")
VOCAB = corpus.default_vocab()
LINES = corpus.generate_corpus(200, seed=1)
PROMPTS = sorted({corpus.split_line(ln)[0] for ln in LINES})
TIMING = {"tokens_per_s"}


class Crash(Exception):
    pass


class CrashingBackend:
    """The numpy backend, except that the n-th call of ``fn`` raises Crash (a killed process)."""

    def __init__(self, fn, n):
        self.fn, self.left = fn, n

    def __getattr__(self, name):
        f = getattr(NUMPY, name)
        if name != self.fn:
            return f

        def wrapped(*a, **k):
            self.left -= 1
            if self.left == 0:
                raise Crash(f"killed in {name}")
            return f(*a, **k)
        return wrapped


def same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


def same_params(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def quiet(*a):
    pass


# ---------------------------------------------------------------------------------------------
# stage runners with tiny configs

PC = PretrainConfig(embed=8, hidden=16, steps=7, batch_size=8, eval_every=3, ckpt_every=2, seed=3)


def run_pretrain(run_dir, backend=NUMPY, cfg=PC):
    return pretrain(LINES, VOCAB, cfg, backend=backend, run_dir=run_dir, heldout_texts=LINES[:20],
                    progress="off", log=quiet)


@pytest.fixture(scope="module")
def ref_params(tmp_path_factory):
    params, _ = run_pretrain(str(tmp_path_factory.mktemp("ref")))
    return params


@pytest.fixture(scope="module")
def records(ref_params):
    rng = np.random.default_rng(0)
    judge = lambda p, a, b: 1 if len(a) > len(b) else -1           # noqa: E731  (prefers longer responses)
    recs = collect_preferences(NUMPY, common.policy_part(ref_params), VOCAB, PROMPTS, judge, 40, rng, max_new=12)
    return split_pairs(recs, 0.25, rng)


RC = RewardConfig(steps=7, batch_size=8, eval_every=3, ckpt_every=2, seed=4)
LC = RLConfig(steps=7, batch_size=6, max_new=10, norm_samples=16, ckpt_every=2, seed=5, whiten="population",
              entropy_coef=0.01)


def run_reward(run_dir, ref_params, records, backend=NUMPY, cfg=RC):
    train, held = records
    return train_reward_model(train, held, VOCAB, cfg, ref_params=ref_params, backend=backend, run_dir=run_dir,
                              progress="off", log=quiet)


def true_len(prompts, responses):
    return np.array([len(r) / 10.0 for r in responses])


def run_rl(run_dir, ref_params, rm, backend=NUMPY, cfg=LC):
    return reinforce_finetune(ref_params, VOCAB, PROMPTS, rm, cfg, true_reward=true_len, backend=backend,
                              run_dir=run_dir, progress="off", log=quiet)


@pytest.fixture(scope="module")
def rm_params(tmp_path_factory, ref_params, records):
    rm, _ = run_reward(str(tmp_path_factory.mktemp("rm")), ref_params, records)
    return rm


# ---------------------------------------------------------------------------------------------
# resume == uninterrupted

def test_pretrain_resume_equals_uninterrupted(tmp_path):
    full, info_full = run_pretrain(str(tmp_path / "a"))
    # killed in step 6 (the 6th training call; +1 for the held-out loss at step 3): last checkpoint at 4
    with pytest.raises(Crash):
        run_pretrain(str(tmp_path / "b"), backend=CrashingBackend("sft_loss_and_grad", 7))
    assert len(read_metrics(tmp_path / "b" / "metrics" / "pretrain.jsonl")) == 5
    resumed, info = run_pretrain(str(tmp_path / "b"))
    same_params(full, resumed)
    same_rows(read_metrics(tmp_path / "a" / "metrics" / "pretrain.jsonl"),
              read_metrics(tmp_path / "b" / "metrics" / "pretrain.jsonl"))
    assert info == info_full
    # a finished stage is loaded, not re-run
    again, _ = run_pretrain(str(tmp_path / "b"), backend=CrashingBackend("sft_loss_and_grad", 1))
    same_params(full, again)


def test_reward_resume_equals_uninterrupted(tmp_path, ref_params, records):
    full, info_full = run_reward(str(tmp_path / "a"), ref_params, records)
    with pytest.raises(Crash):
        run_reward(str(tmp_path / "b"), ref_params, records, backend=CrashingBackend("bt_loss_and_grad", 6))
    resumed, info = run_reward(str(tmp_path / "b"), ref_params, records)
    same_params(full, resumed)
    same_rows(read_metrics(tmp_path / "a" / "metrics" / "reward.jsonl"),
              read_metrics(tmp_path / "b" / "metrics" / "reward.jsonl"))
    assert info == info_full and 0.0 <= info["heldout_accuracy"] <= 1.0


def test_rl_resume_equals_uninterrupted(tmp_path, ref_params, rm_params):
    full, _ = run_rl(str(tmp_path / "a"), ref_params, rm_params)
    with pytest.raises(Crash):
        run_rl(str(tmp_path / "b"), ref_params, rm_params, backend=CrashingBackend("reinforce_loss_and_grad", 6))
    resumed, _ = run_rl(str(tmp_path / "b"), ref_params, rm_params)
    same_params(full, resumed)
    same_rows(read_metrics(tmp_path / "a" / "metrics" / "rl.jsonl"),
              read_metrics(tmp_path / "b" / "metrics" / "rl.jsonl"))
    # the policy moved, π_ref did not
    assert any(not np.array_equal(full[k], ref_params[k].astype(np.float32)) for k in full)


def test_rl_metrics_file_is_valid(tmp_path, ref_params, rm_params):
    run_rl(str(tmp_path), ref_params, rm_params)
    path = tmp_path / "metrics" / "rl.jsonl"
    with open(path) as f:
        lines = f.read().splitlines()
    rows = [json.loads(ln) for ln in lines]                    # strict JSON, one object per line
    assert rows == read_metrics(path)
    assert [r["step"] for r in rows] == list(range(1, LC.steps + 1))
    for r in rows:
        assert r["stage"] == "rl"
        for key in ("loss", "loss_pg", "loss_value", "loss_ent", "reward", "rm_reward", "true_reward",
                    "kl_per_sequence", "entropy", "response_len", "eos_rate", "grad_norm", "tokens_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["entropy"] > 0 and r["tokens_per_s"] > 0


def test_checkpoint_manifest_holds_config_vocab_and_rng(tmp_path):
    run_pretrain(str(tmp_path))
    stems = common.stage_checkpoints(str(tmp_path), "pretrain")
    assert [os.path.basename(s) for s in stems] == ["pretrain-000007"]      # older ones pruned
    with open(stems[0] + ".json") as f:
        man = json.load(f)
    assert man["schema_version"] >= 1 and man["config"] == dataclasses.asdict(PC)
    assert man["vocab"]["chars"] == corpus.CHARS
    st = man["state"]
    assert st["stage"] == "pretrain" and st["step"] == 7 and st["done"] is True
    assert st["rng_state"]["bit_generator"] == "PCG64" and st["adam_t"] == 7


# ---------------------------------------------------------------------------------------------
# crash safety and clear errors

def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    cfg = dataclasses.replace(PC, steps=4)
    run_pretrain(str(tmp_path), cfg=cfg)
    good = common.stage_checkpoints(str(tmp_path), "pretrain")[0]
    # a newer checkpoint whose save was interrupted (truncated arrays)
    bad = common.checkpoint_stem(str(tmp_path), "pretrain", 6)
    shutil.copy(good + ".json", bad + ".json")
    with open(good + ".npz", "rb") as f:
        data = f.read()
    with open(bad + ".npz", "wb") as f:
        f.write(data[: len(data) // 2])
    said = []
    ck = common.find_resume(str(tmp_path), "pretrain", cfg, log=said.append)
    assert ck["step"] == 4 and ck["path"] == good
    assert len(said) == 1 and "pretrain-000006" in said[0] and "skipping" in said[0]


def test_resume_with_another_config_is_refused(tmp_path):
    run_pretrain(str(tmp_path), cfg=dataclasses.replace(PC, steps=2))
    with pytest.raises(ValueError, match=r"different pretrain config \(.*hidden: checkpoint 16, now 12"):
        run_pretrain(str(tmp_path), cfg=dataclasses.replace(PC, steps=2, hidden=12))


def test_rl_refuses_other_inputs_on_resume(tmp_path, ref_params, rm_params):
    run_rl(str(tmp_path), ref_params, rm_params, cfg=dataclasses.replace(LC, steps=2))
    other = {k: v + 0.01 for k, v in rm_params.items()}
    with pytest.raises(ValueError, match="different π_ref or reward model"):
        run_rl(str(tmp_path), ref_params, other, cfg=dataclasses.replace(LC, steps=2))


def test_load_stage_errors(tmp_path):
    run_pretrain(str(tmp_path), cfg=dataclasses.replace(PC, steps=2))
    stem = common.stage_checkpoints(str(tmp_path), "pretrain")[0]
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint, expected a 'rl' one"):
        common.load_stage(stem, "rl")
    with open(stem + ".json") as f:
        man = json.load(f)
    man["schema_version"] = 99
    with open(stem + ".json", "w") as f:
        json.dump(man, f)
    with pytest.raises(CheckpointError, match="schema_version 99"):
        common.load_stage(stem)


# ---------------------------------------------------------------------------------------------
# other reward sources, dtypes, metrics helpers

def test_rl_with_any_callable_reward_in_float64(tmp_path, ref_params):
    cfg = dataclasses.replace(LC, steps=3, dtype="float64", baseline="loo", whiten="off")

    def reward(prompts, responses):                    # a rule (a human's scores would do as well)
        return np.array([r.count("a") for r in responses], dtype=float)

    params, info = reinforce_finetune(ref_params, VOCAB, PROMPTS, reward, cfg, backend="numpy", run_dir=str(tmp_path),
                                      progress="off", log=quiet)
    assert all(v.dtype == np.float64 for v in params.values())
    rows = read_metrics(tmp_path / "metrics" / "rl.jsonl")
    assert len(rows) == 3 and "true_reward" not in rows[0]
    with pytest.raises(ValueError, match="must return 6 finite numbers"):
        reinforce_finetune(ref_params, VOCAB, PROMPTS, lambda p, r: np.zeros(2), cfg, backend="numpy",
                           progress="off", log=quiet)


def test_bad_stage_arguments(ref_params):
    with pytest.raises(ValueError, match="dtype must be one of"):
        pretrain(LINES, VOCAB, dataclasses.replace(PC, dtype="float16"), backend="numpy", progress="off")
    with pytest.raises(TypeError, match="reward must be reward-model params"):
        reinforce_finetune(ref_params, VOCAB, PROMPTS, 3.0, LC, backend="numpy", progress="off")
    with pytest.raises(ValueError, match="unknown backend"):
        pretrain(LINES, VOCAB, PC, backend="nope", progress="off")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        dataclasses.replace(LC, beta=-1.0).reinforce_config()


def test_metrics_logger_resume_and_strict_reader(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        for s in range(1, 6):
            log.log({"stage": "x", "step": s, "v": float(s), "bad": float("nan")})
    assert [r["bad"] for r in read_metrics(path)] == [None] * 5          # NaN written as null
    MetricsLogger(path, resume_step=3).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:4: metrics row is not valid JSON"):
        read_metrics(path)


def test_metrics_resume_drops_a_torn_line_and_never_truncates_in_place(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        for s in range(1, 5):
            log.log({"stage": "x", "step": s})
    with open(path, "a") as f:
        f.write('{"stage": "x", "st')                                  # a kill mid-row
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]     # the torn row is left out
    (tmp_path / ".m.jsonl.abcd1234.tmp").write_text("left by a kill")
    inode = os.stat(path).st_ino
    with MetricsLogger(path, resume_step=4) as log:                    # nothing after step 4: only the torn line goes
        log.log({"stage": "x", "step": 5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert os.stat(path).st_ino != inode                               # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]                 # the stale temporary is gone
    inode = os.stat(path).st_ino
    MetricsLogger(path, resume_step=5).close()                         # nothing to drop: the file is kept as it is
    assert os.stat(path).st_ino == inode
    import rlhf_ref.io as rio
    real = rio.os.replace

    def killed(*a):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(rio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(path, resume_step=2)
    monkeypatch.setattr(rio.os, "replace", real)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]  # the old file is whole


def test_progress_plain_lines_when_not_a_tty(capsys):
    import io
    buf = io.StringIO()
    with Progress(100, "stage", stream=buf) as bar:
        for _ in range(100):
            bar.update(1, loss=0.5)
    lines = buf.getvalue().splitlines()
    assert bar.mode == "lines" and 5 <= len(lines) <= 11 and "\r" not in buf.getvalue()
    assert lines[-1].startswith("stage 100/100  loss=0.5")


def test_plot_run(tmp_path, ref_params, rm_params):
    pytest.importorskip("matplotlib")
    from rlhf_ref.plot import plot_run
    run_rl(str(tmp_path), ref_params, rm_params, cfg=dataclasses.replace(LC, steps=2))
    out = plot_run(str(tmp_path))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# the field's conventions in the RL stage (issue 9): GRPO, RLOO, PPO, the qvalue critic

from rlhf_ref import lstm, model, optim, reinforce                           # noqa: E402

FIELD = {
    "grpo": dict(group_size=3, baseline="group_mean", group_scale="std", kl_in="loss", kl="k3", beta=0.1),
    "rloo": dict(group_size=2, baseline="group_loo"),
    "ppo": dict(returns="gae", lam=0.9, surrogate="ppo_clip", value_clip=0.2, ppo_epochs=2, clip_low=0.05,
                clip_high=0.08, lr=0.05),
    "qvalue": dict(baseline="qvalue", gamma=0.9),
}


def count_e(prompts, responses):
    return np.array([len(r) / 10.0 - r.count("e") * 0.3 for r in responses])


class Recording:
    """The numpy backend, recording every rollout's prompt tokens and result."""

    def __init__(self):
        self.rollouts = []

    def __getattr__(self, name):
        return getattr(NUMPY, name)

    def rollout(self, params, prompt_tokens, prompt_len, u, **kw):
        ro = NUMPY.rollout(params, prompt_tokens, prompt_len, u, **kw)
        self.rollouts.append((np.array(prompt_tokens), np.array(prompt_len), ro))
        return ro


def field_cfg(name, **kw):
    return RLConfig(**{**dict(steps=4, batch_size=3, max_new=8, ckpt_every=2, seed=9, lr=1e-2), **FIELD[name], **kw})


def run_field(run_dir, ref_params, cfg, backend=NUMPY, **kw):
    return reinforce_finetune(ref_params, VOCAB, PROMPTS, count_e, cfg, backend=backend, run_dir=run_dir,
                              progress="off", log=quiet, **kw)


@pytest.mark.parametrize("name", FIELD)
def test_field_conventions_run_and_resume_identically(tmp_path, ref_params, name):
    cfg = field_cfg(name)
    full, _ = run_field(str(tmp_path / "a"), ref_params, cfg)
    calls_per_step = cfg.ppo_epochs
    with pytest.raises(Crash):          # killed in iteration 3 (its last epoch): resumes from iteration 2
        run_field(str(tmp_path / "b"), ref_params, cfg,
                  backend=CrashingBackend("reinforce_loss_and_grad", 3 * calls_per_step))
    resumed, _ = run_field(str(tmp_path / "b"), ref_params, cfg)
    same_params(full, resumed)
    rows = read_metrics(tmp_path / "a" / "metrics" / "rl.jsonl")
    same_rows(rows, read_metrics(tmp_path / "b" / "metrics" / "rl.jsonl"))
    assert all(math.isfinite(r["loss_kl"]) for r in rows)      # iteration 1: π = π_ref, so k = 0
    assert any(r["loss_kl"] != 0.0 for r in rows) == (cfg.kl_in == "loss")
    for r in rows:
        assert ("ratio_mean" in r) == ("clip_frac" in r) == (cfg.surrogate == "ppo_clip")
    if cfg.surrogate == "ppo_clip":      # epoch 2 moved the policy off the sampling one
        assert all(r["ratio_mean"] != 1.0 and 0.0 <= r["clip_frac"] <= 1.0 for r in rows)
        assert any(r["clip_frac"] > 0 for r in rows)
    if cfg.critic == "qvalue":           # the stage gave the policy a Q head; the checkpoint carries it
        assert full["qvalue.weight"].shape == (len(VOCAB), ref_params["head.weight"].shape[1])
        ck = common.load_stage(common.stage_checkpoints(str(tmp_path / "a"), "rl")[-1], "rl")
        np.testing.assert_array_equal(ck["groups"]["policy"]["qvalue.weight"], full["qvalue.weight"])
        one, _ = run_field(None, ref_params, dataclasses.replace(cfg, steps=1))
        assert not np.array_equal(full["qvalue.weight"], one["qvalue.weight"])      # the Q head is trained


@pytest.mark.parametrize("name", FIELD)
def test_field_iteration_equals_reinforce_loss_and_grad(ref_params, name):
    """float64: one iteration (ppo_epochs updates) of the stage equals Adam on the gradients of
    ``reinforce.loss_and_grad`` recomputed here on the sampled batch: the groups from the prompts,
    old_logp/old_values from the initial parameters, ref_logp from π_ref, R from the reward."""
    cfg = field_cfg(name, steps=1, dtype="float64")
    rcfg = cfg.reinforce_config()
    p0 = {k: v.astype(np.float64) for k, v in ref_params.items()}
    if cfg.critic == "qvalue":
        V, _, H = lstm.check_model(p0, ("head",))
        rng = np.random.default_rng(1)
        p0.update({"qvalue.weight": rng.normal(size=(V, H)) * 0.3, "qvalue.bias": rng.normal(size=V) * 0.1})
    rec = Recording()
    got, _ = run_field(None, ref_params, cfg, backend=rec, init_params=p0)
    assert len(rec.rollouts) == 1
    ptok, pl, ro = rec.rollouts[0]
    B, k = cfg.batch_size * cfg.group_size, cfg.group_size
    assert ptok.shape[0] == B
    for g in range(cfg.batch_size):             # k consecutive samples of one prompt
        for j in range(1, k):
            np.testing.assert_array_equal(ptok[g * k + j], ptok[g * k])
            assert pl[g * k + j] == pl[g * k]
    tokens, mask = np.asarray(ro["tokens"]), np.asarray(ro["mask"])
    group = np.arange(B) // k
    R = count_e(None, common.decode_responses(VOCAB, tokens, mask, pl))
    am = model.action_mask(mask, pl) > 0
    old_logp = reinforce.sequence_logprobs(p0, tokens, mask, pl, cfg.alpha, cfg.eps)
    fwd, _ = model.forward(p0, tokens, mask)
    if cfg.critic == "value":
        old_values = np.where(am, fwd["values"], 0.0)
    else:
        old_values = np.where(am, np.take_along_axis(fwd["qvalues"], tokens[:, :, None], axis=-1)[:, :, 0], 0.0)
    ref = common.policy_part(p0)
    want = {k: v.copy() for k, v in p0.items()}
    state = optim.adam_init(want)
    for _ in range(cfg.ppo_epochs):
        _, grads = reinforce.loss_and_grad(want, tokens, mask, pl, R, rcfg, ref_params=ref, group=group,
                                           old_logp=old_logp, old_values=old_values)
        grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        optim.adam_step(want, grads, state, lr=cfg.lr)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-13, err_msg=key)
    assert any(not np.allclose(got[key], p0[key]) for key in p0)


def test_field_settings_errors(ref_params):
    with pytest.raises(ValueError, match="group_size >= 2"):
        RLConfig(baseline="group_loo")
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        RLConfig(group_size=0)
    with pytest.raises(ValueError, match="ppo_epochs must be an integer >= 1"):
        RLConfig(ppo_epochs=0)
    with pytest.raises(ValueError, match="group_scale='std' needs baseline='group_mean' or 'group_loo'"):
        RLConfig(group_size=2, group_scale="std")


def test_rl_checkpoint_from_before_group_size_resumes(tmp_path, ref_params):
    """A checkpoint written before group_size/ppo_epochs existed resumes (their defaults are the old
    behaviour); one that says otherwise is refused."""
    cfg = dataclasses.replace(field_cfg("qvalue"), baseline="value")
    full, _ = run_field(str(tmp_path / "a"), ref_params, cfg)
    with pytest.raises(Crash):          # stopped in iteration 3: the checkpoint of iteration 2 stays
        run_field(str(tmp_path / "b"), ref_params, cfg, backend=CrashingBackend("reinforce_loss_and_grad", 3))
    stem = common.stage_checkpoints(str(tmp_path / "b"), "rl")[-1]
    with open(stem + ".json") as f:
        man = json.load(f)
    for k in ("group_size", "ppo_epochs"):
        del man["config"][k]
    with open(stem + ".json", "w") as f:
        json.dump(man, f)
    resumed, _ = run_field(str(tmp_path / "b"), ref_params, cfg)
    same_params(full, resumed)
    with pytest.raises(ValueError, match="group_size: checkpoint 1, now 2"):
        run_field(str(tmp_path / "b"), ref_params, dataclasses.replace(cfg, group_size=2))
