"""What every training stage shares: the backend, text ↔ token batches, sampling, checkpoints.

Every heavy computation of the pipeline goes through a *backend* (docs/internals.md, "The
backend interface"): ``rollout``, ``sft_loss_and_grad``, ``bt_loss_and_grad``,
``reward_forward``, ``reinforce_loss_and_grad`` and ``sequence_logprobs``. The stages never call
the reference modules for those, so a compiled backend speeds up this same code unchanged.
A stage takes ``backend`` as a name ("auto", "numpy", "cython", "numba", "cuda": resolved by
``rlhf_ref.backends.get``) or as a backend module itself.

Text layout (docs/conventions.md §2): a text is ``BOS + characters (+ EOS)``; a prompt is ``BOS +
prompt characters`` and its ``prompt_len`` counts the BOS; the response follows.

Checkpoints (``save_stage`` / ``load_stage``) go through ``rlhf_ref.io``: an ``.npz`` of arrays
(never pickled) and a JSON manifest with the schema version, the stage's config, the vocabulary,
the step reached, the optimiser step count and the state of the stage's random generator
(``Generator.bit_generator.state`` is plain JSON), so a resumed stage continues exactly where an
uninterrupted one would be.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..tokenizer import EOS, PAD, Vocab

DTYPES = {"float32": np.float32, "float64": np.float64}


# ---------------------------------------------------------------------------------------------
# backend

def resolve_backend(backend="auto", job="train"):
    """A backend module from a name (through the registry) or the module itself."""
    if not isinstance(backend, str):
        missing = [f for f in ("rollout", "sft_loss_and_grad", "reinforce_loss_and_grad") if not hasattr(backend, f)]
        if missing:
            raise TypeError(f"backend must be a name or a backend module; {backend!r} lacks {missing}")
        return backend
    from .. import backends
    return backends.get(backend, job=job)


def backend_name(be):
    """The short name of a backend module ('numpy', 'cython', ...)."""
    name = getattr(be, "NAME", None) or getattr(be, "name", None)
    if isinstance(name, str):
        return name
    mod = getattr(be, "__name__", type(be).__name__)
    return mod.rsplit(".", 1)[-1].replace("_backend_", "").strip("_")


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# text <-> token batches

class EncodedTexts:
    """A list of token sequences stored padded once, so that batches are cheap slices.

    ``ids`` (N, Tmax) int64 right-padded with PAD, ``lengths`` (N,).
    """

    def __init__(self, seqs):
        seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        if not seqs:
            raise ValueError("no sequences to encode")
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.ids = np.full((len(seqs), int(self.lengths.max())), PAD, dtype=np.int64)
        for i, s in enumerate(seqs):
            self.ids[i, :len(s)] = s

    def __len__(self):
        return len(self.lengths)

    def batch(self, idx):
        """(tokens (B, T), mask (B, T)) for the rows idx, T the longest of them."""
        idx = np.asarray(idx, dtype=np.int64)
        L = self.lengths[idx]
        T = int(L.max())
        tokens = self.ids[idx, :T].copy()
        mask = (np.arange(T)[None, :] < L[:, None]).astype(np.float64)
        return tokens, mask


def encode_texts(vocab, texts, eos=True, errors="strict"):
    """Texts as BOS + characters (+ EOS), kept padded once (``EncodedTexts``).

    errors="replace" maps characters outside the vocabulary to UNK (for sampled text, whose UNK
    decodes to U+FFFD, and for preference files from elsewhere)."""
    return EncodedTexts([vocab.encode(t, eos=eos, errors=errors) for t in texts])


def encode_prompts(vocab, prompts, max_new):
    """Prompt batch for sampling: tokens (B, Pmax + max_new) with BOS + prompt, and prompt_len (B,)."""
    if int(max_new) < 1:
        raise ValueError(f"max_new (the response length limit) must be >= 1, got {max_new}")
    enc = [vocab.encode(p) for p in prompts]
    pl = np.array([len(e) for e in enc], dtype=np.int64)
    T = int(pl.max()) + int(max_new)
    tokens = np.full((len(enc), T), PAD, dtype=np.int64)
    for b, e in enumerate(enc):
        tokens[b, :len(e)] = e
    return tokens, pl


def decode_responses(vocab, tokens, mask, prompt_len):
    """The response text of each row (after the prompt, up to EOS)."""
    out = []
    for b in range(tokens.shape[0]):
        n = int(mask[b].sum())
        out.append(vocab.decode(tokens[b, int(prompt_len[b]):n]))
    return out


def ended_with_eos(tokens, mask):
    """(B,) bool: the row's last real token is EOS (False: truncated at the length limit)."""
    n = mask.sum(axis=1).astype(np.int64)
    return tokens[np.arange(len(n)), np.maximum(n - 1, 0)] == EOS


def pair_batch(vocab, prompts, responses):
    """Full texts BOS + prompt + response + EOS as (tokens, mask), for the reward model."""
    enc = EncodedTexts([vocab.encode(p + r, eos=True, errors="replace") for p, r in zip(prompts, responses)])
    return enc.batch(np.arange(len(enc)))


def generate(backend, params, vocab, prompts, rng, max_new, alpha=1.0, eps=0.0, kind="boltzmann",
             ref_params=None, values=False):
    """Sample one response per prompt through ``backend.rollout``.

    The uniforms u (B, T) are drawn from ``rng`` (the only randomness). Returns the rollout dict
    plus 'prompt_len', 'prompts', 'responses' (decoded text) and 'eos' (ended with EOS).
    """
    prompts = list(prompts)
    tokens, pl = encode_prompts(vocab, prompts, max_new)
    u = rng.random(tokens.shape)                                       # (B, T) token-aligned uniforms
    ro = dict(backend.rollout(params, tokens, pl, u, alpha=alpha, eps=eps, kind=kind, eos_id=EOS,
                              ref_params=ref_params, values=values))
    ro["prompt_len"] = pl
    ro["prompts"] = prompts
    ro["responses"] = decode_responses(vocab, ro["tokens"], ro["mask"], pl)
    ro["eos"] = ended_with_eos(ro["tokens"], ro["mask"])
    return ro


# ---------------------------------------------------------------------------------------------
# parameters

def policy_part(params):
    """The policy without its critic heads (what π_ref keeps and what ``rollout`` needs)."""
    return {k: v for k, v in params.items() if not k.startswith(("value.", "qvalue."))}


def copy_params(params):
    return {k: np.array(v, copy=True) for k, v in params.items()}


def cast_params(params, dtype):
    return {k: np.asarray(v, dtype=dtype).copy() for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# random generators (their JSON-able state: rlhf_ref.io.generator_state)

def make_rng(seed, stage):
    """The stage's generator: PCG64 seeded from (seed, a fixed number per stage name)."""
    tag = int.from_bytes(stage.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), tag])))


# ---------------------------------------------------------------------------------------------
# checkpoints

def config_dict(cfg):
    return dataclasses.asdict(cfg)


def save_stage(path, *, stage, step, done, cfg, vocab, groups, rng=None, opt_state=None, extra=None):
    """Write a stage checkpoint atomically through ``rlhf_ref.io.save_checkpoint``.

    groups     {'policy': params, 'rm': params, ...}: arrays stored as '<group>/<key>'
    opt_state  Adam state ({'t', 'm', 'v'}): arrays 'adam_m/<key>', 'adam_v/<key>'; t in the manifest
    Manifest: {"config": the stage's config, "vocab": ..., "state": {"stage", "step", "done",
    "adam_t", "rng_state", "extra"}}.
    """
    from .. import io
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    arrays = {}
    for g, params in groups.items():
        for k, v in params.items():
            arrays[f"{g}/{k}"] = np.asarray(v)
    state = {"stage": stage, "step": int(step), "done": bool(done), "groups": sorted(groups)}
    if opt_state is not None:
        for k in opt_state["m"]:
            arrays[f"adam_m/{k}"] = opt_state["m"][k]
            arrays[f"adam_v/{k}"] = opt_state["v"][k]
        state["adam_t"] = int(opt_state["t"])
    if rng is not None:
        state["rng_state"] = io.generator_state(rng)
    state["extra"] = extra or {}
    manifest = {"config": config_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg),
                "vocab": vocab.to_json(), "state": state}
    io.save_checkpoint(path, arrays, manifest)
    return path


# the parameter group each stage trains (its Adam state has that group's keys) and the heads each
# group's model must have
_TRAINED = {"pretrain": "policy", "rl": "policy", "reward": "rm"}
_HEADS = {"policy": ("head",), "rm": ("reward",)}


def _check_groups(groups, opt_state, stage, npz):
    """Every array of a checkpoint is one the model can use: float32/float64, the shapes of one
    LSTM with its heads, Adam moments shaped like the parameters they belong to. An error names
    the file and the array."""
    from .. import lstm
    from ..io import CheckpointError
    for g, params in groups.items():
        dtypes = set()
        for k, a in params.items():
            if a.dtype not in (np.float32, np.float64):
                raise CheckpointError(npz, f"array '{g}/{k}' has dtype {a.dtype}; a model's parameters are "
                                           f"float32 or float64")
            dtypes.add(a.dtype)
        if len(dtypes) > 1:
            raise CheckpointError(npz, f"the arrays of '{g}/' mix dtypes {sorted(str(d) for d in dtypes)}; "
                                       f"one model has one float dtype")
        if g not in _HEADS:
            continue
        for k, nd in (("embedding.weight", 2), ("lstm.weight_hh_l0", 2)):
            if k not in params or params[k].ndim != nd:
                raise CheckpointError(npz, f"array '{g}/{k}' is missing or not {nd}-D (it holds "
                                           f"{'nothing' if k not in params else params[k].shape})")
        try:
            lstm.check_model(params, required_heads=_HEADS[g], name=g)
        except (ValueError, TypeError) as e:
            raise CheckpointError(npz, f"the {g} model's arrays cannot be used: {e}") from None
    if opt_state is not None:
        g = _TRAINED.get(stage)
        params = groups.get(g, {})
        for mv in ("m", "v"):
            if set(opt_state[mv]) != set(params):
                raise CheckpointError(npz, f"the Adam '{mv}' arrays (adam_{mv}/...) are not those of '{g}/'")
            for k, a in opt_state[mv].items():
                if a.shape != params[k].shape or a.dtype != params[k].dtype:
                    raise CheckpointError(npz, f"array 'adam_{mv}/{k}' has shape {a.shape} dtype {a.dtype}; "
                                               f"'{g}/{k}' has {params[k].shape} {params[k].dtype}")


def _count(v, what, where, hi=2 ** 53):
    from ..io import CheckpointError
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise CheckpointError(where, f"manifest {what} must be an integer from 0 to {hi}, got {v!r:.80}")
    return v


def load_stage(path, stage=None):
    """Read a stage checkpoint; returns a dict with 'groups', 'opt_state', 'rng', 'step', 'done',
    'config', 'vocab', 'extra', 'stage'. Errors (missing file, truncated, wrong schema version, a
    pickle inside, arrays the model cannot use) are ``rlhf_ref.io.CheckpointError`` naming the
    file; a file refused for what it is (a symlink, a FIFO, over a size limit) is a
    ``rlhf_ref.safe_read.FileReadError``."""
    from .. import io
    npz, json_path = io.checkpoint_paths(path)
    arrays, manifest = io.load_checkpoint(path)
    st = manifest.get("state")
    if not isinstance(st, dict) or "stage" not in st or "step" not in st or not isinstance(manifest.get("config"), dict):
        raise io.CheckpointError(json_path, "not an rlhf_ref pipeline checkpoint (its manifest has no "
                                            "'state' with 'stage' and 'step', or no 'config' object)")
    if not isinstance(st["stage"], str):
        raise io.CheckpointError(json_path, f"manifest state.stage must be a string, got {st['stage']!r:.80}")
    if stage is not None and st["stage"] != stage:
        raise io.CheckpointError(json_path, f"a {st['stage']!r:.80} checkpoint, expected a {stage!r} one")
    step = _count(st["step"], "state.step", json_path)
    groups = {}
    for name, a in arrays.items():
        g, _, k = name.partition("/")
        if g not in ("adam_m", "adam_v"):
            groups.setdefault(g, {})[k] = a
    opt_state = None
    if "adam_t" in st:
        opt_state = {"t": _count(st["adam_t"], "state.adam_t", json_path),
                     "m": {n.partition("/")[2]: a for n, a in arrays.items() if n.startswith("adam_m/")},
                     "v": {n.partition("/")[2]: a for n, a in arrays.items() if n.startswith("adam_v/")}}
    _check_groups(groups, opt_state, st["stage"], npz)
    try:
        vocab = Vocab.from_json(manifest.get("vocab"))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise io.CheckpointError(json_path, f"bad vocabulary in the manifest: {e}") from None
    rng = None
    if "rng_state" in st:
        try:
            rng = io.generator_from_state(st["rng_state"])
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise io.CheckpointError(json_path, f"bad state.rng_state in the manifest: {e}") from None
    extra = st.get("extra") or {}
    if not isinstance(extra, dict):
        raise io.CheckpointError(json_path, f"manifest state.extra must be an object, got {extra!r:.80}")
    return {"groups": groups, "opt_state": opt_state, "rng": rng,
            "step": step, "done": bool(st.get("done", False)), "config": manifest["config"],
            "vocab": vocab, "extra": extra, "stage": st["stage"], "path": os.fspath(path)}


def checkpoint_stem(run_dir, stage, step):
    """``<run_dir>/checkpoints/<stage>-<step, 6 digits>`` (+ .npz and .json)."""
    return os.path.join(run_dir, "checkpoints", f"{stage}-{int(step):06d}")


def stage_checkpoints(run_dir, stage):
    """The stems of a stage's checkpoints in ``run_dir``, newest (highest step) first."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        head, _, num = stem.rpartition("-")
        if ext == ".json" and head == stage and num.isdigit():
            found.append((int(num), os.path.join(folder, stem)))
    return [p for _, p in sorted(found, reverse=True)]


def clean_checkpoint_folder(run_dir, stage):
    """Remove what a kill during a save leaves in ``<run_dir>/checkpoints``: ``atomic_open``'s
    temporaries of this stage's files and this stage's ``.npz`` without a manifest (the save
    writes the npz first). Regular files only. Returns the paths removed."""
    from .. import io
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    removed = io.clean_stale_temps(folder, prefix=stage + "-")
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        head, _, num = stem.rpartition("-")
        p = os.path.join(folder, name)
        if ext == ".npz" and head == stage and num.isdigit() and not os.path.lexists(os.path.join(folder, stem + ".json")):
            if io.remove_regular_file(p):
                removed.append(p)
    return removed


def find_resume(run_dir, stage, cfg, log=print):
    """The newest readable checkpoint of ``stage`` in ``run_dir`` (None if there is none).

    A checkpoint that fails to load (a crash in the middle of a save, a damaged file) is
    reported and skipped for the one before it: saves never delete the previous checkpoint
    until the new one is complete. A readable one written with another config is an error.
    """
    from .. import io
    if not run_dir:
        return None
    clean_checkpoint_folder(run_dir, stage)
    for stem in stage_checkpoints(run_dir, stage):
        try:
            ck = load_stage(stem, stage)
        except io.CheckpointError as e:
            log(f"  warning: skipping an unreadable checkpoint: {e}")
            continue
        check_same_config(ck, cfg, stem)
        return ck
    return None


def save_and_prune(run_dir, stage, step, **kw):
    """Save the stage's checkpoint for ``step``, then delete its older checkpoints."""
    stem = checkpoint_stem(run_dir, stage, step)
    save_stage(stem, stage=stage, step=step, **kw)
    for old in stage_checkpoints(run_dir, stage):
        if old != stem:
            for ext in (".json", ".npz"):
                try:
                    os.unlink(old + ext)
                except FileNotFoundError:
                    pass
    return stem


def check_same_config(ckpt, cfg, path):
    """A resumed stage must run the config it was started with; say which fields differ. A field
    the checkpoint lacks (written before the field existed) counts as its default, the behaviour
    of that older version."""
    now = config_dict(cfg)
    then = dict(ckpt["config"])
    for f in dataclasses.fields(cfg):
        if f.name not in then and f.default is not dataclasses.MISSING:
            then[f.name] = f.default
    diff = [f"{k}: checkpoint {then.get(k)!r}, now {now[k]!r}" for k in now if then.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path} was written with a different {ckpt['stage']} config ({'; '.join(diff)}); "
                         f"resume with the same settings, or start a fresh run folder")
