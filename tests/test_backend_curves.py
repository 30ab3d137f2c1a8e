"""A short training run gives the same curve on every backend (issue 4, "Proof").

Pretraining and then REINFORCE fine-tuning, a few iterations each, in float64, through the
pipeline's own code with ``backend=<name>``: the per-iteration metrics and the final parameters
of every available compiled backend must equal the NumPy reference's. Sampling consumes the same
pre-drawn uniforms, so in float64 the rollouts pick the same tokens (a CDF tie at rounding distance
is possible in principle; with these seeds it does not happen, and a tie would show as a failure
that names the iteration, not pass silently).
"""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_ref import backends
from rlhf_ref.annotator import SimulatedAnnotator
from rlhf_ref.data import corpus
from rlhf_ref.metrics import read_metrics
from rlhf_ref.pipeline.pretrain import PretrainConfig, pretrain
from rlhf_ref.pipeline.rl import RLConfig, reinforce_finetune

COMPILED = [pytest.param(n, marks=() if st.available else pytest.mark.skip(reason=f"{n}: {st.reason}"))
            for n, st in backends.available().items()
            if n in ("cython", "numba")]

# float64 through ~30 Adam steps: the kernels' sums run in another order than NumPy's, and Adam
# divides by √v̂, which magnifies relative differences of tiny gradients; 1e-7 is ~10⁹ ulps of
# headroom for that and still fails on any real difference (a wrong gradient moves the loss at 1e-3).
RTOL = 1e-7


def _run(name, tmp_path):
    lines = corpus.load_corpus()[:200]
    vocab = corpus.default_vocab()
    pc = PretrainConfig(embed=8, hidden=16, steps=20, batch_size=16, dtype="float64", eval_every=0,
                        ckpt_every=20, seed=3)
    run = tmp_path / name
    ref, _ = pretrain(lines, vocab, pc, backend=name, run_dir=str(run), progress="off", log=lambda *a: None)
    ann = SimulatedAnnotator()
    prompts = [corpus.split_line(l)[0] for l in lines[:64]]
    reward = lambda ps, rs: ann.true_rewards(rs, ps)
    lc = RLConfig(steps=6, batch_size=8, max_new=12, dtype="float64", ckpt_every=6, seed=4, entropy_coef=0.01)
    params, _ = reinforce_finetune(ref, vocab, prompts, reward, lc, backend=name, run_dir=str(run),
                                   progress="off", log=lambda *a: None)
    return (read_metrics(str(run / "metrics" / "pretrain.jsonl")), read_metrics(str(run / "metrics" / "rl.jsonl")),
            params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run("numpy", tmp_path_factory.mktemp("curves"))


NUMERIC_SKIP = ("seconds", "tokens_per_s", "time", "elapsed", "lr")


def _compare_rows(rows, ref_rows, stage, name):
    assert len(rows) == len(ref_rows) > 0, f"{stage}: {len(rows)} rows on {name}, {len(ref_rows)} on numpy"
    for i, (r, q) in enumerate(zip(rows, ref_rows)):
        for k, v in q.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or any(s in k for s in NUMERIC_SKIP):
                continue
            assert k in r, f"{stage} iteration {i}: {name} does not log {k!r}"
            np.testing.assert_allclose(r[k], v, rtol=RTOL, atol=1e-12,
                                       err_msg=f"{stage} iteration {i}, {k!r}: {name} vs numpy")


@pytest.mark.parametrize("name", COMPILED)
def test_same_curve_on_every_backend(name, reference, tmp_path):
    pre, rl, params = _run(name, tmp_path)
    pre_ref, rl_ref, params_ref = reference
    _compare_rows(pre, pre_ref, "pretrain", name)
    _compare_rows(rl, rl_ref, "rl", name)
    for k in params_ref:
        np.testing.assert_allclose(params[k], params_ref[k], rtol=RTOL, atol=1e-10, err_msg=f"final {k}: {name}")
