"""The RL stage on Ray workers computes the numbers of one process (rlhf_ref.pipeline.distributed).

(a) no Ray: the two-phase arithmetic (per-shard forward, global statistics, per-shard backward,
    gradients summed in shard order) equals ``reinforce.loss_and_grad`` on the whole batch for
    every convention and any split, including a shard of one row, an empty shard and a shard whose
    rows have no action — and per-shard statistics would not (the test can fail).
(b) one local Ray cluster for the module (``ray.init(num_cpus=2)``), executors of 1, 2 and 3
    workers made once: per-iteration metrics and final parameters equal the single-process run
    in float64 for configurations that together take every value of every switch; float32 runs
    are bit-identical twice; a killed worker is replaced and the run equals an uninterrupted one;
    a learner stopped mid-run resumes to the same result; a worker's error reaches the caller; a
    hung worker is a TimeoutError; `rlhf-ref train-rl --workers 2 --address ...` joins the cluster.
(c) importing the library never imports Ray.

Ray is an optional extra: without it (b) is skipped, except under RLHF_REF_REQUIRE_RAY=1 (CI),
where a missing Ray is an error.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rlhf_ref import backends, lstm, reinforce
from rlhf_ref.data import corpus
from rlhf_ref.metrics import read_metrics
from rlhf_ref.pipeline import common, distributed as dist
from rlhf_ref.pipeline.rl import RLConfig, reinforce_finetune
from rlhf_ref.reinforce import ReinforceConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMPY = backends.get("numpy")
VOCAB = corpus.default_vocab()
PROMPTS = sorted({corpus.split_line(ln)[0] for ln in corpus.generate_corpus(200, seed=1)})

# configurations that together take every value of every switch of the first table rows
# (kl, returns, batch baselines, whiten, shift_mean, aggregation, γ < 1, entropy bonus); issue 9's
# values and the qvalue critic: NEW_CONVENTIONS and RAY_NEW below
CONVENTIONS = [
    dict(kl="k1", returns="rtg", baseline="value", whiten="off", shift_mean=True, aggregation="token_mean",
         gamma=1.0, entropy_coef=0.0),
    dict(kl="k2", returns="total", baseline="mean", whiten="population", shift_mean=False, aggregation="seq_mean",
         gamma=0.9, entropy_coef=0.05),
    dict(kl="k3", returns="rtg", baseline="loo", whiten="bessel", shift_mean=True, aggregation="seq_sum",
         gamma=0.95, entropy_coef=0.02),
    dict(kl="k1", returns="total", baseline="none", whiten="population", shift_mean=True, aggregation="token_mean",
         gamma=0.8, entropy_coef=0.01),
]
CONV_IDS = [f"{c['kl']}-{c['returns']}-{c['baseline']}-{c['whiten']}-{c['aggregation']}" for c in CONVENTIONS]


# ---------------------------------------------------------------------------------------------
# (a) the arithmetic, no Ray

def _batch(seed, dtype=np.float64, heads=("head", "value")):
    """A policy with a value head and a batch of 7 rows whose rows 5 and 6 have no action."""
    rng = np.random.default_rng(seed)
    V, T = 9, 8
    params = lstm.init_params(V, 4, 6, rng, heads=heads, dtype=dtype)
    lengths = np.array([8, 5, 3, 8, 6, 4, 7])
    prompt_len = np.array([2, 1, 2, 3, 1, 4, 7])          # rows 5, 6: the prompt fills the row
    tokens = rng.integers(0, V, (7, T))
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    tokens = np.where(mask > 0, tokens, 0)
    am = reinforce.model.action_mask(mask, prompt_len)
    ref_logp = np.where(am > 0, -rng.random((7, T)) * 3, 0.0)
    reward = rng.normal(size=7)
    return params, tokens, mask, prompt_len, ref_logp, reward


SPLITS = [(7,), (1, 6), (3, 2, 2), (2, 0, 3, 2), (5, 2), (4, 1, 2)]    # (5, 2), (2 | 3 | 2): rows 5-6 alone


@pytest.mark.parametrize("conv", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_two_phase_equals_the_reference(conv, sizes):
    params, tokens, mask, pl, ref_logp, reward = _batch(0)
    cfg = ReinforceConfig(alpha=1.3, eps=0.1, beta=0.3, **conv)
    want, gwant = reinforce.loss_and_grad(params, tokens, mask, pl, reward, cfg, ref_logp=ref_logp)
    got, ggot = dist.two_phase_loss_and_grad(params, tokens, mask, pl, reward, ref_logp, cfg, sizes)
    for k in ("action_mask", "logp", "ref_logp", "entropy", "kl", "rewards", "returns", "values", "baseline",
              "advantages", "weights", "loss_pg", "loss_ent", "loss_value", "loss"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
    assert sorted(ggot) == sorted(gwant)
    for k in gwant:
        np.testing.assert_allclose(ggot[k], gwant[k], rtol=1e-11, atol=1e-14, err_msg=k)


# issue 9's conventions, one configuration per new value (and the qvalue critic); the batch's groups
# {0, 2}, {1, 3, 4} (rows 5, 6: no action) interleave and span the shards of every split
NEW_CONVENTIONS = [
    dict(kl="k3", kl_in="loss", baseline="group_mean", group_scale="std", group_eps=1e-3, aggregation="fixed_len"),
    dict(kl="k2", baseline="group_loo", aggregation="seq_mean", gamma=0.9, entropy_coef=0.02),
    dict(returns="gae", lam=0.8, gamma=0.95, surrogate="ppo_clip", clip_low=0.1, clip_high=0.3, value_clip=0.05,
         aggregation="fixed_len", norm_len=11.0),
    dict(baseline="qvalue", whiten="population", gamma=0.9, entropy_coef=0.03),
]
NEW_IDS = ["grpo", "rloo", "ppo-gae", "qvalue"]
GROUP = np.array([0, 1, 0, 1, 1, 2, 2])


def _old(seed, logp, am):
    """old_logp = logp + noise (some ratios inside the clip range, some outside), old_values random."""
    rng = np.random.default_rng(seed)
    return (np.where(am > 0, logp + rng.normal(size=am.shape) * 0.3, 0.0),
            np.where(am > 0, rng.normal(size=am.shape) * 0.3, 0.0))


@pytest.mark.parametrize("conv", NEW_CONVENTIONS, ids=NEW_IDS)
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_two_phase_equals_the_reference_for_issue9_conventions(conv, sizes):
    cfg = ReinforceConfig(alpha=1.3, eps=0.1, beta=0.3, **conv)
    params, tokens, mask, pl, ref_logp, reward = _batch(2, heads=("head", cfg.critic))
    logp = reinforce.sequence_logprobs(params, tokens, mask, pl, cfg.alpha, cfg.eps)
    old_logp, old_values = _old(3, logp, reinforce.model.action_mask(mask, pl))
    kw = dict(group=GROUP, old_logp=old_logp, old_values=old_values)
    want, gwant = reinforce.loss_and_grad(params, tokens, mask, pl, reward, cfg, ref_logp=ref_logp, **kw)
    got, ggot = dist.two_phase_loss_and_grad(params, tokens, mask, pl, reward, ref_logp, cfg, sizes, **kw)
    keys = ["action_mask", "logp", "ref_logp", "entropy", "kl", "rewards", "returns", "baseline", "advantages",
            "ratio", "weights", "loss_pg", "loss_ent", "loss_value", "loss_kl", "loss"]
    for k in keys + (["values"] if cfg.critic == "value" else []):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
    assert sorted(ggot) == sorted(gwant)
    for k in gwant:
        np.testing.assert_allclose(ggot[k], gwant[k], rtol=1e-11, atol=1e-14, err_msg=k)
    if cfg.surrogate == "ppo_clip":                     # the test reaches both branches of the clip
        r = want["ratio"][want["action_mask"] > 0]
        assert np.any((r < 1 - cfg.clip_low) | (r > 1 + cfg.clip_high)) and np.any(np.abs(r - 1) < 0.1)
    if cfg.kl_in == "loss":
        assert want["loss_kl"] != 0.0


def test_per_shard_statistics_would_differ():
    """The sanity check of the test above: statistics formed per shard give another gradient."""
    params, tokens, mask, pl, ref_logp, reward = _batch(1)
    cfg = ReinforceConfig(baseline="mean", whiten="population")
    _, gwant = reinforce.loss_and_grad(params, tokens, mask, pl, reward, cfg, ref_logp=ref_logp)
    per_shard = [reinforce.loss_and_grad(params, tokens[s], mask[s], pl[s], reward[s], cfg, ref_logp=ref_logp[s])[1]
                 for s in (slice(0, 3), slice(3, 5))]                  # rows 5-6 have no action
    summed = dist.sum_in_order(per_shard)
    assert max(np.max(np.abs(summed[k] - gwant[k])) for k in gwant) > 1e-3


def test_shard_sizes_and_bad_splits():
    assert dist.shard_sizes(7, 3) == [3, 2, 2]
    assert dist.shard_sizes(2, 3) == [1, 1, 0]
    params, tokens, mask, pl, ref_logp, reward = _batch(0)
    with pytest.raises(ValueError, match="sum to the batch size 7"):
        dist.two_phase_loss_and_grad(params, tokens, mask, pl, reward, ref_logp, ReinforceConfig(), (3, 3))
    with pytest.raises(ValueError, match="qvalue"):
        dist.two_phase_loss_and_grad(params, tokens, mask, pl, reward, ref_logp, ReinforceConfig(baseline="qvalue"))


# ---------------------------------------------------------------------------------------------
# (c) importing the library does not import Ray

BLOCKED = """
import sys
sys.modules["ray"] = None                               # `import ray` now raises ImportError
import rlhf_ref, rlhf_ref.envs, rlhf_ref.pipeline, rlhf_ref.pipeline.rl, rlhf_ref.pipeline.distributed
import rlhf_ref.demo, rlhf_ref.cli
from rlhf_ref.pipeline.distributed import RayExecutor
try:
    RayExecutor(2)
except ImportError as e:
    print("IMPORTERROR", e)
"""

UNBLOCKED = """
import sys
import rlhf_ref, rlhf_ref.envs, rlhf_ref.pipeline, rlhf_ref.pipeline.rl, rlhf_ref.pipeline.distributed
import rlhf_ref.demo, rlhf_ref.cli, rlhf_ref.pipeline.commands
print("RAY" if any(m == "ray" or m.startswith("ray.") for m in sys.modules) else "NORAY")
"""


def _py(code, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_library_works_without_ray_and_never_imports_it():
    r = _py(BLOCKED)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "rlhf-ref[ray]" in r.stdout
    r = _py(UNBLOCKED)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "NORAY"


# ---------------------------------------------------------------------------------------------
# (b) on a local Ray cluster

def _ray():
    try:
        import ray
        return ray
    except ImportError as e:
        if os.environ.get("RLHF_REF_REQUIRE_RAY") == "1":
            pytest.fail(f"RLHF_REF_REQUIRE_RAY=1 but ray cannot be imported: {e}")
        pytest.skip(f"ray is not installed (pip install 'rlhf-ref[ray]'): {e}")


@pytest.fixture(scope="module")
def cluster():
    ray = _ray()
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def executors(cluster):
    """Workers for B = 5 rows: 1 (5), 2 (3 + 2) and 3 (1 + 3 + 1: shards of one row)."""
    ex = {1: dist.RayExecutor(1, backend="numpy", timeout=120),
          2: dist.RayExecutor(2, backend="numpy", timeout=120),
          3: dist.RayExecutor(3, backend="numpy", timeout=120, sizes=(1, 3, 1))}
    yield ex
    for e in ex.values():
        e.close()


@pytest.fixture(scope="module")
def ref_params():
    return lstm.init_params(len(VOCAB), 6, 8, np.random.default_rng(7), dtype=np.float64)


@pytest.fixture(scope="module")
def rm_params(ref_params):
    rng = np.random.default_rng(8)
    rm = {k: v for k, v in lstm.init_params(len(VOCAB), 6, 8, rng, heads=(), dtype=np.float64).items()}
    rm["reward.weight"] = rng.normal(size=(1, 8))
    rm["reward.bias"] = np.zeros(1)
    return rm


def _reward(prompts, responses):
    return np.array([len(r) / 10.0 - r.count(" ") * 0.3 for r in responses])


RL_FIELDS = {f.name for f in dataclasses.fields(RLConfig)}


def _cfg(dtype="float64", steps=3, **kw):
    # shift_mean reaches the RL stage once RLConfig is derived from ReinforceConfig; until then the
    # stage runs shift_mean=True and (a) covers shift_mean=False
    kw = {k: v for k, v in kw.items() if k in RL_FIELDS or k != "shift_mean"}
    return RLConfig(steps=steps, batch_size=5, max_new=6, lr=3e-2, ckpt_every=2, seed=11, dtype=dtype, beta=0.3,
                    **kw)


def _run(ref, reward, cfg, run_dir=None, executor=None, log=lambda *a: None, **kw):
    return reinforce_finetune(ref, VOCAB, PROMPTS, reward, cfg, backend="numpy", run_dir=run_dir, progress="off",
                              log=log, executor=executor, **kw)


NOT_COMPARED = {"tokens_per_s", "executor", "workers"}


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED}
            for r in read_metrics(os.path.join(run_dir, "metrics", "rl.jsonl"))]


def _close(a, b, rtol):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * 1e-3, err_msg=k)


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# the RL stage's issue-9 settings, one configuration per new value (group_size 2: B = 10 rows, the
# 3-worker split 1 + 8 + 1 and the 2-worker 5 + 5 cut groups in two; ppo_epochs 2 re-steps on the workers)
RAY_NEW = [
    dict(group_size=2, kl="k3", kl_in="loss", baseline="group_mean", group_scale="std", group_eps=1e-3,
         aggregation="fixed_len"),
    dict(group_size=2, baseline="group_loo", aggregation="seq_sum", entropy_coef=0.02),
    dict(returns="gae", lam=0.8, surrogate="ppo_clip", clip_low=0.1, clip_high=0.3, value_clip=0.2, ppo_epochs=2,
         aggregation="fixed_len", norm_len=9.0),
    dict(baseline="qvalue", gamma=0.9, ppo_epochs=2, surrogate="ppo_clip", entropy_coef=0.01),
]


@pytest.mark.parametrize("conv", CONVENTIONS + RAY_NEW, ids=CONV_IDS + ["grpo", "rloo", "ppo-gae", "qvalue"])
def test_float64_equals_one_process_on_1_2_3_workers(conv, executors, ref_params, tmp_path):
    cfg = _cfg(**conv)
    want, _ = _run(ref_params, _reward, cfg, str(tmp_path / "single"))
    rows = _rows(str(tmp_path / "single"))
    for n, ex in executors.items():
        saved = ex.sizes
        if saved is not None and cfg.rows != sum(saved):
            ex.sizes = (1, cfg.rows - 2, 1)
        try:
            got, info = _run(ref_params, _reward, cfg, str(tmp_path / f"w{n}"), executor=ex)
        finally:
            ex.sizes = saved
        assert info["workers"] == n and info["executor"] == "ray"
        _close(got, want, 1e-9)
        got_rows = _rows(str(tmp_path / f"w{n}"))
        assert len(got_rows) == len(rows) == cfg.steps
        for a, b in zip(got_rows, rows):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(b[k], str):
                    assert a[k] == b[k]
                else:
                    assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (n, a["step"], k)
        raw = read_metrics(os.path.join(str(tmp_path / f"w{n}"), "metrics", "rl.jsonl"))
        assert all(r["workers"] == n and r["executor"] == "ray" for r in raw)


def test_training_step_on_the_learner_equals_one_process(executors, ref_params, rm_params):
    """train_step="learner": rollouts and rewards on the workers, the learner's backend step."""
    ex = executors[3]
    cfg = _cfg(whiten="bessel", baseline="mean", entropy_coef=0.01)
    want, _ = _run(ref_params, rm_params, cfg)
    ex.train_step = "learner"
    try:
        got, _ = _run(ref_params, rm_params, cfg, executor=ex)
    finally:
        ex.train_step = "workers"
    _close(got, want, 1e-9)


def test_compiled_backend_workers_equal_its_single_process_run(cluster, ref_params, rm_params):
    """Workers holding the Cython backend (rollout, reward) against one process running Cython's fused
    training step: the same numbers to rounding in float64."""
    st = backends.status("cython")
    if not st.available:
        if "cython" in os.environ.get("RLHF_REF_REQUIRE_BACKENDS", ""):
            pytest.fail(f"cython is required here but unavailable: {st.reason}")
        pytest.skip(f"the cython backend is not built here: {st.reason}")
    cfg = _cfg(whiten="population", baseline="loo", entropy_coef=0.01, norm_samples=8)
    want, _ = reinforce_finetune(ref_params, VOCAB, PROMPTS, rm_params, cfg, backend="cython", progress="off",
                                 log=lambda *a: None)
    ex = dist.RayExecutor(2, backend="cython", timeout=120)
    try:
        got, _ = reinforce_finetune(ref_params, VOCAB, PROMPTS, rm_params, cfg, backend="cython", progress="off",
                                    log=lambda *a: None, executor=ex)
    finally:
        ex.close()
    _close(got, want, 1e-9)


def test_more_workers_than_rows(executors, ref_params):
    """B = 1 on 2 workers: worker 1 gets no row (no rollout, no gradient) and the run is unchanged."""
    cfg = dataclasses.replace(_cfg(), batch_size=1)
    want, _ = _run(ref_params, _reward, cfg)
    got, _ = _run(ref_params, _reward, cfg, executor=executors[2])
    _close(got, want, 1e-9)


def test_reward_model_scored_on_the_workers(executors, ref_params, rm_params):
    cfg = _cfg(norm_samples=8, whiten="bessel", baseline="loo")
    want, winfo = _run(ref_params, rm_params, cfg)
    got, info = _run(ref_params, rm_params, cfg, executor=executors[2])
    _close(got, want, 1e-9)
    assert info["reward_mean"] == winfo["reward_mean"]


def test_float32_same_worker_count_is_bit_identical(executors, ref_params, rm_params):
    cfg = _cfg("float32", whiten="population", entropy_coef=0.01)
    a, _ = _run(ref_params, rm_params, cfg, executor=executors[2])
    b, _ = _run(ref_params, rm_params, cfg, executor=executors[2])
    _same(a, b)
    single, _ = _run(ref_params, rm_params, cfg)
    _close(a, single, 1e-3)                                 # float32: close, not identical


def test_killed_worker_is_replaced_and_the_run_is_unchanged(executors, ref_params, tmp_path):
    ex = executors[3]
    cfg = _cfg(whiten="population", baseline="mean")
    want, _ = _run(ref_params, _reward, cfg, str(tmp_path / "a"), executor=ex)
    calls = []
    old = ex.pids()

    def kill_worker_1(executor, phase):                     # iteration 2, just after phase 1 is sent
        calls.append(phase)
        if len(calls) == 3:
            os.kill(old[1], signal.SIGKILL)
    ex.on_submit = kill_worker_1
    try:
        got, _ = _run(ref_params, _reward, cfg, str(tmp_path / "b"), executor=ex, log=print)
    finally:
        ex.on_submit = None
    new = ex.pids()
    assert new[0] == old[0] and new[2] == old[2] and new[1] != old[1]
    assert calls == [1, 2, 1, 1, 2, 1, 2]                   # iteration 2 ran again from phase 1
    _same(got, want)
    assert _rows(str(tmp_path / "a")) == _rows(str(tmp_path / "b"))


def test_worker_killed_in_a_ppo_epoch_is_replaced_and_the_run_is_unchanged(executors, ref_params, tmp_path):
    """ppo_epochs 2: a worker killed in iteration 1's second epoch is replaced, given its rows of the
    batch (``load_batch``), and the epoch is recomputed: the run equals an uninterrupted one."""
    ex = executors[3]
    cfg = _cfg(steps=2, surrogate="ppo_clip", ppo_epochs=2, value_clip=0.2)
    want, _ = _run(ref_params, _reward, cfg, str(tmp_path / "a"), executor=ex)
    calls = []
    old = ex.pids()

    def kill_worker_1(executor, phase):                     # iteration 1, epoch 2, just after its forward is sent
        calls.append(phase)
        if calls.count(3) == 1 and phase == 3:
            os.kill(old[1], signal.SIGKILL)
    ex.on_submit = kill_worker_1
    try:
        got, _ = _run(ref_params, _reward, cfg, str(tmp_path / "b"), executor=ex)
    finally:
        ex.on_submit = None
    new = ex.pids()
    assert new[0] == old[0] and new[2] == old[2] and new[1] != old[1]
    assert calls.count(1) == 2 and calls.count(3) == 3      # the epoch ran again, not the iteration
    _same(got, want)
    assert _rows(str(tmp_path / "a")) == _rows(str(tmp_path / "b"))


class Crash(Exception):
    pass


def test_stopped_learner_resumes_to_the_same_result(executors, ref_params, tmp_path):
    cfg = _cfg(steps=5)
    want, _ = _run(ref_params, _reward, cfg, str(tmp_path / "a"), executor=executors[2])
    n = []

    def crashing(prompts, responses):                       # the learner dies in iteration 4
        n.append(1)
        if len(n) == 4:
            raise Crash("learner killed")
        return _reward(prompts, responses)
    with pytest.raises(Crash):
        _run(ref_params, crashing, cfg, str(tmp_path / "b"), executor=executors[2])
    got, _ = _run(ref_params, _reward, cfg, str(tmp_path / "b"), executor=executors[2])
    _same(got, want)
    assert _rows(str(tmp_path / "a")) == _rows(str(tmp_path / "b"))


def test_worker_error_reaches_the_user(executors, ref_params, rm_params):
    bad = dict(rm_params)
    bad["reward.weight"] = np.zeros((1, 3))                 # wrong shape: the workers' reward_forward refuses it
    with pytest.raises(ValueError, match="reward.weight"):
        _run(ref_params, bad, _cfg(reward_norm=False), executor=executors[2])


def test_hung_worker_is_a_timeout(executors, ref_params):
    ex = executors[1]
    ex.timeout = 1e-4
    try:
        with pytest.raises(TimeoutError, match="no answer within"):
            _run(ref_params, _reward, _cfg(), executor=ex)
    finally:
        ex.timeout = 120


def test_train_rl_cli_joins_a_cluster(cluster, ref_params, rm_params, tmp_path):
    """`rlhf-ref train-rl --workers 2 --address ADDR` (a second process joining the cluster)."""
    run = str(tmp_path / "run")
    vocab = VOCAB
    for stage, group, params in (("pretrain", "policy", ref_params), ("reward", "rm", rm_params)):
        common.save_stage(common.checkpoint_stem(run, stage, 1), stage=stage, step=1, done=True, cfg={}, vocab=vocab,
                          groups={group: params})
    addr = cluster.address_info["address"]
    sets = ["--set", "steps=2", "--set", "batch_size=4", "--set", "max_new=5", "--set", "norm_samples=4"]
    r = subprocess.run([sys.executable, "-m", "rlhf_ref", "train-rl", "--out", run, "--backend", "numpy",
                        "--dtype", "float64", "--progress", "off", "--workers", "2", "--address", addr, "--train-step", "learner", *sets],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_metrics(os.path.join(run, "metrics", "rl.jsonl"))
    assert [(x["executor"], x["workers"]) for x in rows] == [("ray", 2), ("ray", 2)]
    extra = common.load_stage(common.stage_checkpoints(run, "rl")[0], "rl")["extra"]
    assert extra["executor"] == "ray" and extra["workers"] == 2
