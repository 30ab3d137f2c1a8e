"""Command-line entries of the pipeline: ``rlhf-ref sample`` and ``rlhf-ref train-{pretrain,rm,rl}``.

With a person in the loop instead of the simulated annotator::

    rlhf-ref train-pretrain --out runs/me                              # π_ref on the embedded corpus
    rlhf-ref sample --checkpoint runs/me --pairs 200 --out cands.jsonl # two responses per prompt
    rlhf-ref label cands.jsonl -o prefs.jsonl                          # a person judges them
    rlhf-ref train-rm --out runs/me --preferences prefs.jsonl          # the reward model
    rlhf-ref train-rl --out runs/me                                    # REINFORCE against it
    rlhf-ref sample --checkpoint runs/me --prompt "the cat " --n 5     # what it writes now

A run folder holds every stage's checkpoints (``checkpoints/<stage>-<step>.npz/.json``) and
metrics; each command resumes its stage from the folder and finds the earlier stages' results
there. Any field of a stage's config can be set with ``--set name=value`` (repeatable; the
fields and their meaning: ``PretrainConfig``, ``RewardConfig``, ``RLConfig``).
``--checkpoint`` takes a checkpoint (``.npz``, ``.json`` or the stem) or a run folder (its newest
RL checkpoint, else its pretraining one).

``sample``, ``train_pretrain``, ``train_rm`` and ``train_rl`` are the commands of ``cli.COMMANDS``
(each holds its ``add_arguments`` and ``main``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, NamedTuple

import numpy as np

from . import common

STAGES = ("rl", "pretrain")


class CommandError(Exception):
    """A user error: printed as ``rlhf-ref <command>: error: <message>``, exit status 2."""


def _fail(cmd, e):
    sys.stderr.write(f"rlhf-ref {cmd}: error: {e}\n")
    return 2


def _user_errors():
    """Exceptions that are a user's mistake (bad file, bad value, unavailable backend), not a bug."""
    from ..backends import BackendUnavailable
    from ..safe_read import FileReadError     # CheckpointError, PreferenceFileError too
    from .distributed import RayUnavailable
    return (CommandError, FileReadError, BackendUnavailable, RayUnavailable, ValueError,
            FileNotFoundError, IsADirectoryError, PermissionError)


def apply_sets(cfg, sets):
    """A copy of the dataclass ``cfg`` with ``name=value`` assignments, typed by the table of
    conventions (conventions.py) for its switches, else by the field's current value."""
    from ..conventions import TABLE
    names = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for s in sets or ():
        name, eq, value = s.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or name not in names:
            raise CommandError(f"--set {s!r}: expected name=value with name one of {', '.join(sorted(names))}")
        kind = TABLE[name].type if name in TABLE else type(getattr(cfg, name))
        try:
            if kind is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError("expected true or false")
                changes[name] = value.lower() in ("1", "true", "yes")
            else:
                changes[name] = kind(value)
        except ValueError as e:
            raise CommandError(f"--set {s!r}: {name} must be a {kind.__name__} ({e})") from None
    try:
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        raise CommandError(f"--set: {e}") from None


def load_policy(path):
    """(params, vocab, description) of a policy checkpoint or of a run folder's newest one."""
    from ..io import CheckpointError
    path = os.fspath(path)
    if os.path.isdir(path) and not path.endswith((".npz", ".json")):
        for stage in STAGES:
            for stem in common.stage_checkpoints(path, stage):
                ck = common.load_stage(stem, stage)
                return ck["groups"]["policy"], ck["vocab"], f"{stage} step {ck['step']} ({stem})"
        raise CommandError(f"{path} is a folder with no policy checkpoint (checkpoints/rl-*.json or "
                           f"checkpoints/pretrain-*.json)")
    ck = common.load_stage(path)
    if "policy" not in ck["groups"]:
        raise CheckpointError(f"{path}: a {ck['stage']!r} checkpoint holds no policy (it holds "
                              f"{', '.join(sorted(ck['groups']))})")
    return ck["groups"]["policy"], ck["vocab"], f"{ck['stage']} step {ck['step']} ({path})"


def _stage_result(run_dir, stage, group):
    """The finished result of an earlier stage in the run folder, or a clear error."""
    for stem in common.stage_checkpoints(run_dir, stage):
        ck = common.load_stage(stem, stage)
        if not ck["done"]:
            raise CommandError(f"{run_dir}: the {stage} stage stopped at step {ck['step']}; "
                               f"finish it first (rlhf-ref train-{'rm' if stage == 'reward' else stage} --out {run_dir})")
        return ck["groups"][group], ck["vocab"], ck
    raise CommandError(f"{run_dir} has no {stage} checkpoint; run rlhf-ref train-"
                       f"{'rm' if stage == 'reward' else stage} --out {run_dir} first")


# ---------------------------------------------------------------------------------------------
# rlhf-ref sample

def sample_arguments(p):
    p.add_argument("--checkpoint", required=True,
                   help="a policy checkpoint (.npz/.json/stem) or a run folder (its newest RL, else pretrain, checkpoint)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeatable; default: the empty prompt, i.e. whole lines)")
    p.add_argument("--n", type=int, default=5, help="samples per prompt (default 5)")
    p.add_argument("--alpha", type=float, default=1.0, help="inverse temperature α > 0 (default 1)")
    p.add_argument("--eps", type=float, default=0.0, help="ε ∈ [0, 1] of the ε-mixture / ε-greedy (default 0)")
    p.add_argument("--kind", default="boltzmann", choices=("boltzmann", "eps_greedy", "greedy"),
                   help="policy used for decoding (default boltzmann)")
    p.add_argument("--max-len", type=int, default=40, help="maximum response length in tokens (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling uniforms (default 0)")
    p.add_argument("--backend", default="auto", help="auto, numpy, cython, numba or cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON Lines {prompt, response, eos} instead of text")
    p.add_argument("--pairs", type=int, default=None, metavar="N",
                   help="instead: write N label candidates {id, prompt, a, b} (two responses to each of N "
                        "corpus training prompts, or to --prompt) to --out, for rlhf-ref label")
    p.add_argument("--out", default=None, help="output file of --pairs")
    return p


def sample_main(args):
    try:
        return _sample(args)
    except _user_errors() as e:
        return _fail("sample", e)


def _sample(args):
    from ..policy import check_policy_args
    if args.n < 1:
        raise CommandError(f"--n must be >= 1, got {args.n}")
    if args.max_len < 1:
        raise CommandError(f"--max-len must be >= 1, got {args.max_len}")
    check_policy_args(args.alpha, args.eps, args.kind)
    if (args.pairs is None) != (args.out is None):
        raise CommandError("--pairs N and --out FILE go together")
    params, vocab, what = load_policy(args.checkpoint)
    be = common.resolve_backend(args.backend, job="rollout")
    rng = np.random.default_rng(args.seed)
    prompts = args.prompt if args.prompt else [""]
    for p in prompts:
        try:
            vocab.encode(p)
        except ValueError as e:
            raise CommandError(f"--prompt {p!r}: {e}") from None
    policy = common.policy_part(params)
    if args.pairs is not None:
        from ..label import write_candidates
        if args.pairs < 1:
            raise CommandError(f"--pairs must be >= 1, got {args.pairs}")
        if not args.prompt:
            from ..data import corpus
            pool = list(corpus.default_split().train)
            prompts = [pool[i] for i in rng.permutation(len(pool))[:args.pairs]]
        take = [prompts[i % len(prompts)] for i in range(args.pairs)]
        a = common.generate(be, policy, vocab, take, rng, args.max_len, args.alpha, args.eps, args.kind)["responses"]
        b = common.generate(be, policy, vocab, take, rng, args.max_len, args.alpha, args.eps, args.kind)["responses"]
        seen, cands = set(), []
        for p, x, y in zip(take, a, b):
            if x != y and (p, x, y) not in seen:
                seen.add((p, x, y))
                cands.append({"prompt": p, "a": x, "b": y})
        write_candidates(args.out, cands)
        print(f"wrote {len(cands)} candidate pairs to {args.out} (from {what}); "
              f"label them with: rlhf-ref label {args.out} -o preferences.jsonl")
        return 0
    take = [p for p in prompts for _ in range(args.n)]
    ro = common.generate(be, policy, vocab, take, rng, args.max_len, args.alpha, args.eps, args.kind)
    if not args.json:
        print(f"# {what}; α={args.alpha} ε={args.eps} {args.kind}, seed {args.seed}")
    for p, r, e in zip(take, ro["responses"], ro["eos"]):
        if args.json:
            print(json.dumps({"prompt": p, "response": r, "eos": bool(e)}, ensure_ascii=False))
        else:
            print(f"{p}{r}" + ("" if e else " …"))
    return 0


# ---------------------------------------------------------------------------------------------
# rlhf-ref train-pretrain / train-rm / train-rl

def _common_train_args(p, what):
    p.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--backend", default="auto", help="auto, numpy, cython, numba or cuda (default auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="parameter dtype")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                   help=f"set fields of {what} (repeatable), e.g. --set steps=500 lr=3e-3 --set seed=1")
    p.add_argument("--progress", default="auto", choices=("auto", "tqdm", "bar", "lines", "off"))
    return p


def pretrain_arguments(p):
    _common_train_args(p, "PretrainConfig")
    p.add_argument("--corpus", default=None,
                   help="a UTF-8 text file, one training line each (default: the embedded corpus)")
    return p


def rm_arguments(p):
    _common_train_args(p, "RewardConfig")
    p.add_argument("--preferences", required=True, help="preference JSON Lines (rlhf-ref label's output, or TRL's format)")
    p.add_argument("--policy", default=None,
                   help="policy checkpoint whose body initialises the reward model (default: the run's pretrain)")
    return p


def rl_arguments(p):
    _common_train_args(p, "RLConfig")
    p.add_argument("--policy", default=None, help="π_ref checkpoint (default: the run folder's finished pretraining)")
    p.add_argument("--reward-model", default=None, help="reward-model checkpoint (default: the run folder's)")
    p.add_argument("--prompts", default=None, help="a UTF-8 file of prompts, one per line (default: the corpus's training prompts)")
    p.add_argument("--workers", type=int, default=0,
                   help="run on N Ray workers, same numbers to rounding (pip install 'rlhf-ref[ray]'; "
                        "default 0: this process)")
    p.add_argument("--address", default=None,
                   help="with --workers: join the Ray cluster at ADDR (default: start a local one, "
                        "shut down at the end)")
    p.add_argument("--train-step", default="workers", choices=("workers", "learner"),
                   help="with --workers: the gradient on the workers (two phases, default) or on this process "
                        "(only the rollouts distributed; faster on a few workers)")
    return p


def _read_lines(path, what):
    from ..safe_read import read_text
    lines = [ln for ln in read_text(path, what=f"{what} file").split("\n") if ln.strip()]
    if not lines:
        raise CommandError(f"{what} file {path} has no lines")
    return lines


def pretrain_main(args):
    try:
        from .pretrain import PretrainConfig, pretrain
        from ..data import corpus
        cfg = apply_sets(PretrainConfig(seed=args.seed, dtype=args.dtype), args.set)
        vocab = corpus.default_vocab()
        lines = _read_lines(args.corpus, "--corpus") if args.corpus else corpus.load_corpus()
        for i, ln in enumerate(lines):
            try:
                vocab.encode(ln)
            except ValueError as e:
                raise CommandError(f"--corpus line {i + 1}: {e}") from None
        perm = common.make_rng(cfg.seed, "corpus-split").permutation(len(lines))
        n_ce = len(lines) // 10
        held = [lines[i] for i in np.sort(perm[:n_ce])]
        train = [lines[i] for i in np.sort(perm[n_ce:])]
        _, info = pretrain(train, vocab, cfg, backend=args.backend, run_dir=args.out, heldout_texts=held or None,
                           progress=args.progress)
        print(f"pretraining done: {json.dumps(info)}; checkpoints in {os.path.join(args.out, 'checkpoints')}")
        return 0
    except _user_errors() as e:
        return _fail("train-pretrain", e)


def rm_main(args):
    try:
        from .reward import RewardConfig, split_pairs, train_reward_model
        from ..preferences import load_preferences
        cfg = apply_sets(RewardConfig(seed=args.seed, dtype=args.dtype), args.set)
        if args.policy:
            ref, vocab, _ = load_policy(args.policy)
        else:
            ref, vocab, _ = _stage_result(args.out, "pretrain", "policy")
        records = load_preferences(args.preferences)
        if len(records) < 2:
            raise CommandError(f"{args.preferences}: holds {len(records)} usable preference(s) (ties are dropped); need at least 2")
        train, held = split_pairs(records, cfg.heldout_frac, common.make_rng(cfg.seed, "pair-split"))
        _, info = train_reward_model(train, held, vocab, cfg, ref_params=ref, backend=args.backend, run_dir=args.out,
                                     progress=args.progress)
        print(f"reward model done: {json.dumps(info)}")
        return 0
    except _user_errors() as e:
        return _fail("train-rm", e)


def rl_main(args):
    try:
        from .rl import RLConfig, reinforce_finetune
        from ..data import corpus
        cfg = apply_sets(RLConfig(seed=args.seed, dtype=args.dtype), args.set)
        if args.workers < 0 or (args.address and args.workers < 1):
            raise CommandError(f"--workers must be >= 0 (and >= 1 with --address), got {args.workers}")
        if args.policy:
            ref, vocab, _ = load_policy(args.policy)
        else:
            ref, vocab, _ = _stage_result(args.out, "pretrain", "policy")
        if args.reward_model:
            ck = common.load_stage(args.reward_model, "reward")
            rm, rvocab = ck["groups"]["rm"], ck["vocab"]
        else:
            rm, rvocab, _ = _stage_result(args.out, "reward", "rm")
        if rvocab != vocab:
            raise CommandError("the reward model and the policy use different vocabularies")
        prompts = _read_lines(args.prompts, "--prompts") if args.prompts else list(corpus.default_split().train)
        if "value.weight" not in ref:
            from .. import lstm
            H = lstm.dims(ref)[2]
            ref = dict(ref, **{"value.weight": np.zeros((1, H), ref["head.weight"].dtype),
                               "value.bias": np.zeros((1,), ref["head.weight"].dtype)})
        _, info = reinforce_finetune(ref, vocab, prompts, rm, cfg, backend=args.backend, run_dir=args.out,
                                     progress=args.progress, workers=args.workers, address=args.address,
                                     train_step=args.train_step)
        print(f"RL fine-tuning done ({info['executor']}, {info['workers']} Ray workers); "
              f"sample with: rlhf-ref sample --checkpoint {args.out}")
        return 0
    except _user_errors() as e:
        return _fail("train-rl", e)


class _Command(NamedTuple):
    """A command of cli.COMMANDS: ``add_arguments(parser)`` and ``main(args) -> int``."""
    add_arguments: Callable
    main: Callable


sample = _Command(sample_arguments, sample_main)
train_pretrain = _Command(pretrain_arguments, pretrain_main)
train_rm = _Command(rm_arguments, rm_main)
train_rl = _Command(rl_arguments, rl_main)
