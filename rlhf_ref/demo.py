"""``rlhf-ref demo``: the whole RLHF loop on the embedded corpus, on a laptop, in a few minutes.

    1. pretrain   a character LSTM policy on the corpus (next-token cross-entropy) → frozen π_ref
    2. prefer     sample two π_ref responses to each of many training prompts; the simulated
                  annotator (a hidden true preference: sentiment of well-formed sentences) judges
                  each pair with Bradley–Terry noise → preferences.jsonl
    3. reward     fit the reward model to those judgements (Bradley–Terry loss); held-out accuracy
    4. RL         REINFORCE on training prompts, reward from the reward model, KL penalty β to π_ref
    5. evaluate   on the 200 held-out prompts: true win rate of the fine-tuned policy over π_ref,
                  true reward before/after, KL per sequence, style (log-likelihood under π_ref,
                  share of grammatical sentences, share of corpus words)

The true reward is never used for training; it is logged beside the learned one so that
reward over-optimisation would show. The run folder (``--out``, default ``runs/demo-<time>``)
holds ``metrics/*.jsonl``, ``checkpoints/``, ``preferences.jsonl``, ``samples.jsonl``,
``curves.png`` (when matplotlib is installed) and ``summary.json``. Running the demo again
with the same ``--out`` resumes every stage from its last checkpoint (a finished stage is
loaded, not re-run); ``--seed`` fixes every random draw.

How style is judged: the fine-tuned policy's responses should still be sentences the corpus
could contain. Three measures: the share the corpus grammar parses (``wellformed_rate``), the
mean log-likelihood per token of the responses under π_ref (``ref_loglik_per_token``; π_ref's own
samples give the reference level) and the share of words that occur in the corpus.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .pipeline import common
from .pipeline.evaluate import corpus_words, evaluate
from .pipeline.pretrain import PretrainConfig, pretrain
from .pipeline.reward import RewardConfig, EncodedPairs, collect_preferences, split_pairs, train_reward_model
from .pipeline.rl import RLConfig, RewardModelReward, reinforce_finetune

__all__ = ["DemoConfig", "stage_configs", "run_demo", "add_arguments", "main"]


@dataclass
class DemoConfig:
    """The demo run (the stages' own settings come from ``stage_configs``)."""
    seed: int = 0               #: seeds every stage (initialisation, batches, sampling, the annotator's noise)
    backend: str = "auto"       #: auto, numpy, cython, numba, cuda
    dtype: str = "float32"      #: parameter dtype of every model
    quick: bool = False         #: tiny sizes, for tests: well under a minute, targets not expected
    n_show: int = 6             #: samples shown before and after fine-tuning


def stage_configs(seed=0, dtype="float32", quick=False):
    """(PretrainConfig, RewardConfig, RLConfig) of the demo; tuned for the NumPy backend on 2 cores."""
    pc = PretrainConfig(seed=seed, dtype=dtype)
    rc = RewardConfig(seed=seed, dtype=dtype)
    lc = RLConfig(seed=seed, dtype=dtype)
    if quick:
        pc = replace(pc, hidden=32, embed=16, steps=120, eval_every=60, ckpt_every=60)
        rc = replace(rc, n_pairs=256, steps=40, batch_size=32, eval_every=20, ckpt_every=20)
        lc = replace(lc, steps=8, batch_size=32, norm_samples=64, ckpt_every=4)
    return pc, rc, lc


class _Out:
    """Prints the demo's narrative to a stream (stdout by default), flushing each line."""

    def __init__(self, stream):
        self.stream = sys.stdout if stream is None else stream

    def __call__(self, *parts):
        self.stream.write(" ".join(str(p) for p in parts) + "\n")
        self.stream.flush()


def _table(rows, say):
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, a, b in rows:
        say(f"  {name:<{w0}}  {a:>{w1}}  {b}")


def _fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def run_demo(out=None, seed=0, backend="auto", dtype="float32", quick=False, progress="auto", stream=None,
             resume=True, configs=None, workers=0, address=None):
    """Run the demo; returns the summary dict (also written to ``<out>/summary.json``).

    configs  optional (PretrainConfig, RewardConfig, RLConfig) replacing ``stage_configs``'s
    workers  N ≥ 1: the RL stage on N Ray workers (``pipeline.distributed``), on a local cluster or
             the one at ``address``
    """
    from . import io
    from .annotator import SimulatedAnnotator
    from .data import corpus as C
    from .preferences import load_preferences, save_preferences

    t_start = time.perf_counter()
    say = _Out(stream)
    cfg = DemoConfig(seed=seed, backend=backend, dtype=dtype, quick=quick)
    common.check_dtype(dtype)
    be = common.resolve_backend(backend)
    bname = common.backend_name(be)
    pc, rc, lc = stage_configs(seed, dtype, quick) if configs is None else configs
    if out is None:
        out = os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S") + ("-quick" if quick else ""))
    os.makedirs(out, exist_ok=True)
    if resume:      # what a kill during an atomic write left behind
        io.clean_stale_temps(out, names={"preferences.jsonl", "samples.jsonl", "summary.json"})
    seconds = {}

    say(f"rlhf-ref demo{' (quick)' if quick else ''}: seed {seed}, backend {bname} ({dtype}), run folder {out}")

    # data: the embedded corpus, its fixed prompt split, the simulated annotator
    lines = C.load_corpus()
    split = C.default_split()
    vocab = C.default_vocab()
    # pretraining reads the corpus (10 % of its lines kept aside to measure held-out cross-entropy);
    # the held-out *prompts* are held out from the reward model and RL, which is what evaluation tests
    perm = common.make_rng(seed, "corpus-split").permutation(len(lines))
    n_ce = len(lines) // 10
    heldout_lines = [lines[i] for i in np.sort(perm[:n_ce])]
    train_lines = [lines[i] for i in np.sort(perm[n_ce:])]
    ann = SimulatedAnnotator()
    words = corpus_words(lines)

    def true_reward(prompts, responses):
        return ann.true_rewards(responses, prompts)

    def true_win(prompts, a, b):
        return np.array([ann.true_win(x, y, p) for p, x, y in zip(prompts, a, b)])

    def wellformed(prompt, response):
        return C.parse(prompt + response) is not None

    # 1. pretraining
    t = time.perf_counter()
    say(f"\n[1/5] Pretraining the policy on {len(train_lines)} corpus lines "
        f"(LSTM E={pc.embed} H={pc.hidden}, {pc.steps} Adam steps of {pc.batch_size} lines)")
    ref, pinfo = pretrain(train_lines, vocab, pc, backend=be, run_dir=out, heldout_texts=heldout_lines,
                          resume=resume, progress=progress, log=say)
    seconds["pretrain"] = time.perf_counter() - t
    ref_pol = common.policy_part(ref)
    if "heldout_loss" in pinfo:
        say(f"      held-out cross-entropy {pinfo['heldout_loss']:.3f} nats/character")
    show = list(split.heldout[:cfg.n_show])
    peek = common.generate(be, ref_pol, vocab, show, common.make_rng(seed, "peek"), lc.max_new, lc.alpha, lc.eps)
    say("      samples from the pretrained policy π_ref (prompt | response):")
    for p, r in zip(show, peek["responses"]):
        say(f"        {p}| {r}")

    # 2. simulated preferences
    t = time.perf_counter()
    pref_path = os.path.join(out, "preferences.jsonl")
    records = None
    if resume and os.path.lexists(pref_path):
        records = [p.to_dict() for p in load_preferences(pref_path)]
        if len(records) != rc.n_pairs:
            records = None
        else:
            say(f"\n[2/5] Loaded {len(records)} preference pairs from {pref_path}")
    if records is None:
        say(f"\n[2/5] Collecting {rc.n_pairs} preference pairs: two π_ref responses per training prompt, "
            f"judged by the simulated annotator (Bradley–Terry, τ={ann.temperature})")
        prng = common.make_rng(seed, "preferences")

        def judge(prompt, a, b):
            return 1 if ann.compare(a, b, prng, prompt=prompt) else -1

        records = collect_preferences(be, ref_pol, vocab, list(split.train), judge, rc.n_pairs, prng,
                                      rc.max_new, lc.alpha, lc.eps)
        for r in records:
            r["judge"] = "simulated"
        save_preferences(pref_path, records)
        say(f"      wrote {pref_path}")
    seconds["preferences"] = time.perf_counter() - t
    train_recs, held_recs = split_pairs(records, rc.heldout_frac, common.make_rng(seed, "pair-split"))

    # 3. reward model
    t = time.perf_counter()
    say(f"\n[3/5] Training the reward model on {len(train_recs)} pairs ({len(held_recs)} held out), "
        f"{rc.steps} Adam steps of {rc.batch_size} pairs")
    rm, rinfo = train_reward_model(train_recs, held_recs, vocab, rc, ref_params=ref, backend=be, run_dir=out,
                                   resume=resume, progress=progress, log=say)
    seconds["reward"] = time.perf_counter() - t
    held = EncodedPairs(vocab, held_recs)
    rc_ = be.reward_forward(rm, *held.chosen.batch(np.arange(len(held))))
    rr_ = be.reward_forward(rm, *held.rejected.batch(np.arange(len(held))))
    hp = [r["prompt"] for r in held_recs]
    hc = [r["chosen"] for r in held_recs]
    hr = [r["rejected"] for r in held_recs]
    tw = true_win(hp, hc, hr)
    untied = tw != 0.5
    rm_true_acc = float(np.mean((rc_ > rr_)[untied] == (tw[untied] == 1.0))) if untied.any() else None
    ceiling = ann.label_accuracy_ceiling(hc, hr, hp)
    say(f"      held-out accuracy {rinfo['heldout_accuracy']:.3f} against the annotator's judgements "
        f"(the best any model can expect: {ceiling:.3f}); agreement with the hidden true preference "
        f"{_fmt(rm_true_acc)}")

    # 4. REINFORCE fine-tuning
    t = time.perf_counter()
    batch = f"{lc.batch_size} prompts × {lc.group_size} samples" if lc.group_size > 1 else f"{lc.batch_size} responses"
    epochs = f", {lc.ppo_epochs} updates each" if lc.ppo_epochs > 1 else ""
    say(f"\n[4/5] REINFORCE fine-tuning: {lc.steps} iterations of {batch}{epochs} "
        f"(β={lc.beta}, γ={lc.gamma}, {lc.baseline} baseline, lr={lc.lr}); reward = the reward model")
    policy, linfo = reinforce_finetune(ref, vocab, list(split.train), rm, lc, true_reward=true_reward, backend=be,
                                       run_dir=out, resume=resume, progress=progress, log=say, workers=workers,
                                       address=address)
    seconds["rl"] = time.perf_counter() - t

    # 5. evaluation on the held-out prompts
    t = time.perf_counter()
    prompts = list(split.heldout)
    say(f"\n[5/5] Evaluating on {len(prompts)} held-out prompts (one response each from π_ref and the "
        f"fine-tuned policy)")
    rm_reward = RewardModelReward(be, rm, vocab, linfo.get("reward_mean", 0.0), linfo.get("reward_std", 1.0))
    metrics, samples = evaluate(be, policy, ref, vocab, prompts, common.make_rng(seed, "eval"), max_new=lc.max_new,
                                alpha=lc.alpha, eps=lc.eps, true_reward=true_reward, true_win=true_win, words=words,
                                reward=rm_reward.raw, wellformed=wellformed)
    seconds["evaluate"] = time.perf_counter() - t
    with io.atomic_open(os.path.join(out, "samples.jsonl"), "w") as f:
        for p, b, a in zip(samples["prompts"], samples["before"], samples["after"]):
            f.write(json.dumps({"prompt": p, "before": b, "after": a,
                                "true_reward_before": ann.true_reward(b, p),
                                "true_reward_after": ann.true_reward(a, p)}, ensure_ascii=False) + "\n")
    say("      samples (prompt | before → after):")
    for p, b, a in list(zip(samples["prompts"], samples["before"], samples["after"]))[:cfg.n_show]:
        say(f"        {p}| {b}  →  {a}")

    plot_path = None
    try:
        from .plot import plot_run
        plot_path = plot_run(out)
    except Exception as e:          # a plot must never fail the run
        say(f"      (no plot: {type(e).__name__}: {e})")

    total = time.perf_counter() - t_start
    summary = {
        "rm_heldout_accuracy": rinfo["heldout_accuracy"],
        "rm_heldout_true_agreement": rm_true_acc,
        "rm_label_accuracy_ceiling": ceiling,
        "true_win_rate": metrics["true_win_rate"],
        "true_reward_before": metrics["true_reward_before"],
        "true_reward_after": metrics["true_reward_after"],
        "rm_reward_before": metrics["rm_reward_before"],
        "rm_reward_after": metrics["rm_reward_after"],
        "kl_per_sequence": metrics["kl_per_sequence"],
        "ref_loglik_per_token_before": metrics["ref_loglik_per_token_before"],
        "ref_loglik_per_token_after": metrics["ref_loglik_per_token_after"],
        "ref_loglik_per_sequence_before": metrics["ref_loglik_per_sequence_before"],
        "ref_loglik_per_sequence_after": metrics["ref_loglik_per_sequence_after"],
        "wellformed_rate_before": metrics["wellformed_rate_before"],
        "wellformed_rate_after": metrics["wellformed_rate_after"],
        "corpus_word_rate_before": metrics["corpus_word_rate_before"],
        "corpus_word_rate_after": metrics["corpus_word_rate_after"],
        "response_len_before": metrics["response_len_before"],
        "response_len_after": metrics["response_len_after"],
        "n_eval_prompts": metrics["n_prompts"],
        "pretrain_heldout_loss": pinfo.get("heldout_loss"),
        "seconds": total,
        "stage_seconds": seconds,
        "backend": bname,
        "executor": linfo.get("executor", "local"),
        "workers": linfo.get("workers", 0),
        "dtype": dtype,
        "seed": seed,
        "quick": quick,
        "configs": {"pretrain": asdict(pc), "reward": asdict(rc), "rl": asdict(lc)},
        "out": out,
        "plot": plot_path,
    }
    io.atomic_write_text(os.path.join(out, "summary.json"), json.dumps(io.to_jsonable(summary), indent=1) + "\n")

    say("\nSummary (held-out prompts; the true reward is the annotator's hidden preference)")
    _table([
        ("", "π_ref", "fine-tuned"),
        ("true reward (hidden), mean", _fmt(summary["true_reward_before"]), _fmt(summary["true_reward_after"])),
        ("learned reward (RM), mean", _fmt(summary["rm_reward_before"]), _fmt(summary["rm_reward_after"])),
        ("true win rate vs π_ref", "0.500", _fmt(summary["true_win_rate"])),
        ("KL(π‖π_ref) per sequence", "0", _fmt(summary["kl_per_sequence"])),
        ("log-lik under π_ref, per token", _fmt(summary["ref_loglik_per_token_before"]),
         _fmt(summary["ref_loglik_per_token_after"])),
        ("grammatical sentences", _fmt(summary["wellformed_rate_before"]), _fmt(summary["wellformed_rate_after"])),
        ("words from the corpus", _fmt(summary["corpus_word_rate_before"]), _fmt(summary["corpus_word_rate_after"])),
    ], say)
    say(f"  reward model held-out accuracy {_fmt(summary['rm_heldout_accuracy'])}; "
        f"{total:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); backend {bname}")
    say(f"\nWrote {os.path.join(out, 'summary.json')}" + (f" and {plot_path}" if plot_path else "")
        + f"; metrics in {os.path.join(out, 'metrics')}")
    return summary


# ---------------------------------------------------------------------------------------------
# command line

def limit_blas_threads(n):
    """Cap the BLAS thread pool at ``n`` threads for the rest of the process; returns what was done.

    The models here are small (matrices of a few hundred rows): a second BLAS thread saves
    little, and on a busy machine OpenBLAS's spinning threads can make every product many
    times slower. threadpoolctl when installed, else OpenBLAS's own setter found through ctypes
    (Linux); when neither works nothing changes and the reason is returned.
    """
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(int(n), user_api="blas")
        return f"BLAS threads: {n} (threadpoolctl)"
    except Exception:
        pass
    try:
        import ctypes
        with open("/proc/self/maps") as f:
            libs = sorted({ln.split()[-1] for ln in f if ".so" in ln and "blas" in ln.lower()})
        for lib in libs:
            h = ctypes.CDLL(lib)
            for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                        "openblas_set_num_threads64_", "openblas_set_num_threads"):
                fn = getattr(h, sym, None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int]
                    fn(int(n))
                    return f"BLAS threads: {n} ({os.path.basename(lib)})"
        return "BLAS threads unchanged (no OpenBLAS found; set OMP_NUM_THREADS to choose)"
    except Exception as e:
        return f"BLAS threads unchanged ({type(e).__name__}: {e})"


def add_arguments(parser):
    """The ``rlhf-ref demo`` options."""
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo-<date>-<time>); "
                        "an existing one is resumed")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--backend", default="auto", help="auto, numpy, cython, numba or cuda (default auto)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="parameter dtype (default float32)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (well under a minute)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse to reuse checkpoints in an existing --out (start the stages afresh)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: the matrices are small; 0 leaves the BLAS default)")
    parser.add_argument("--progress", default="auto", choices=("auto", "tqdm", "bar", "lines", "off"),
                        help="progress display (default: a bar on a terminal, a few lines otherwise)")
    parser.add_argument("--workers", type=int, default=0,
                        help="run the RL stage on N Ray workers (pip install 'rlhf-ref[ray]'; default 0: this process)")
    parser.add_argument("--address", default=None,
                        help="with --workers: join the Ray cluster at ADDR (default: start a local one)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                        help="set fields of the RL stage's RLConfig (as rlhf-ref train-rl --set), e.g. "
                             "--set group_size=4 baseline=group_loo")
    return parser


def main(args):
    """Entry point for ``rlhf-ref demo``: returns the process exit code."""
    if args.threads < 0:
        sys.stderr.write(f"rlhf-ref demo: error: --threads must be >= 0, got {args.threads}\n")
        return 2
    if args.workers < 0 or (args.address and not args.workers):
        sys.stderr.write(f"rlhf-ref demo: error: --workers must be >= 0 (and >= 1 with --address), "
                         f"got {args.workers}\n")
        return 2
    if args.threads:
        limit_blas_threads(args.threads)
    from .pipeline.commands import _user_errors, apply_sets
    try:
        pc, rc, lc = stage_configs(args.seed, args.dtype, args.quick)
        configs = (pc, rc, apply_sets(lc, getattr(args, "set", None)))
        run_demo(out=args.out, seed=args.seed, backend=args.backend, dtype=args.dtype, quick=args.quick,
                 progress=args.progress, resume=args.resume, workers=args.workers, address=args.address,
                 configs=configs)
    except _user_errors() as e:
        sys.stderr.write(f"rlhf-ref demo: error: {e}\n")
        return 2
    return 0
