"""The hostile-input probe (issue 10): one call of one public entry point on every backend, with one
hostile argument, described by a small JSON-able spec so that a subprocess can rebuild it.

    python tests/_hostile.py BACKEND[,BACKEND...] < specs.json      (one JSON list of specs on stdin)

prints one JSON line per spec, flushed before the next call starts (so that when a signal kills the
process, the parent knows which spec did it: the first one without a line)::

    {"i": 3, "ref": OUTCOME, "backends": {"cython": OUTCOME, ...}}

    OUTCOME = {"s": "ok"}                                  returned (backends: and matched the reference)
            | {"s": "raise", "t": "ValueError", "m": msg}  raised
            | {"s": "mismatch", "d": what}                 returned something else than the reference

A spec is ``{"fn", "dt", "seed", "mut", "arg", "val"}``: the entry point, the params dtype, the
seed of the base inputs (tests/_hostile.py's ``base``), and one mutation ``mut`` of argument ``arg``
with value code ``val`` (``VALUES``). tests/test_hostile.py draws specs with Hypothesis, runs them in
batches and compares the outcomes. Values are compared with tests/_tol.py's rule.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import numpy as np

V, E, H, B, T = 5, 3, 4, 3, 5

FNS = ("rollout", "sequence_logprobs", "reinforce_loss_and_grad", "sft_loss_and_grad", "reward_forward",
       "bt_loss_and_grad", "env")

# value codes -> Python values (JSON carries the code)
VALUES = {
    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "1e39": 1e39, "-3e38": -3e38, "3e38": 3e38,
    "1e300": 1e300, "1e20": 1e20, "1e10": 1e10, "1e8": 1e8, "1e7": 1e7, "1e-45": 1e-45, "1e-320": 1e-320,
    "-0.0": -0.0, "0": 0, "0.0": 0.0, "0.5": 0.5, "1.0": 1.0, "1": 1, "2": 2, "2.7": 2.7, "-1": -1,
    "V": V, "V+1": V + 1, "2**40": 2 ** 40, "2**63-1": 2 ** 63 - 1, "-2**63": -2 ** 63, "2**70": 2 ** 70,
    "True": True, "None": None, "str": "2", "strx": "boltzmann!", "complex": 1 + 0j,
    "f32_1e30": np.float32(1e30), "i64_2": np.int64(2), "arr0_2": np.array(2), "u1m": 1 - 1e-17, "1-2^-53": 1 - 2 ** -53,
    "eps_greedy": "eps_greedy", "greedy": "greedy", "boltzmann": "boltzmann", "list": [1.0],
}

# mutations of an array argument (see _mutate_array)
ARRAY_MUTS = ("dtype:float16", "dtype:float32", "dtype:float64", "dtype:int64", "dtype:int8", "dtype:uint64",
              "dtype:bool", "dtype:object", "dtype:str", "dtype:complex", "ndim+1", "ndim-1", "scalar", "list",
              "none", "shape:row+1", "shape:col+1", "shape:col-1", "empty0", "empty1", "fortran", "noncontig",
              "reversed", "readonly", "value")
# mutations of params (or ref_params): an array mutation of one key, or one of these
PARAM_MUTS = ("pval", "pscale", "pmissing", "pextra", "pnotdict", "pmixed", "plist", "pdim0:V", "pdim0:E", "pdim0:H",
              "pvocab")
PSCALES = (1e20, 1e30, 1e38, 1e-30, 1e-42, 1e300, -1e30)
BATCH_MUTS = ("B=0", "T=0", "T=1", "none")
# the scalar switches of issue 9 (cfg mutations; the others of the config are the base call's)
RL_SCALARS = ("cfg.lam", "cfg.clip_low", "cfg.clip_high", "cfg.value_clip", "cfg.group_eps", "cfg.norm_len")


# ------------------------------------------------------------------------------------ base inputs

# the well-formed ReinforceConfigs of reinforce_loss_and_grad's base calls, by (seed // 2) % 7 (None: the
# default config without group/old_logp/old_values); the others pass all three arrays
RL_CONFIGS = (
    None,
    dict(baseline="group_mean", group_scale="std", group_eps=1e-4),
    dict(baseline="group_loo", group_scale="std", kl_in="loss", kl="k3", aggregation="seq_mean"),
    dict(baseline="group_mean", surrogate="ppo_clip", clip_low=0.2, clip_high=0.28),
    dict(surrogate="ppo_clip", clip_low=0.1, clip_high=0.1, value_clip=0.2, returns="gae", lam=0.95, gamma=0.9),
    dict(returns="gae", lam=0.5, kl_in="loss", kl="k2", value_clip=0.5),
    dict(aggregation="fixed_len", norm_len=8.0, baseline="group_loo", kl_in="loss", surrogate="ppo_clip"),
)


def base(fn, dt, seed):
    """The well-formed inputs of one call (kwargs); every hostile spec changes one thing of them."""
    from rlhf_ref import lstm
    rng = np.random.default_rng(seed)
    dt = np.dtype(dt)
    heads = {"rollout": ("head", "value"), "sequence_logprobs": ("head",), "reinforce_loss_and_grad": ("head", "value"),
             "sft_loss_and_grad": ("head",), "reward_forward": ("reward",), "bt_loss_and_grad": ("reward",),
             "env": ("head",)}[fn]
    p = lstm.init_params(V, E, H, rng, heads=heads, dtype=dt)
    ref = lstm.init_params(V, E, H, rng, heads=("head",), dtype=dt)
    lengths = rng.integers(2, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    tokens = np.where(mask > 0, rng.integers(0, V, size=(B, T)), 0)
    tokens[:, 0] = 1
    pl = np.minimum(rng.integers(1, 3, size=B), lengths - 1)
    if fn == "rollout":
        return dict(params=p, prompt_tokens=tokens, prompt_len=pl, u=rng.random((B, T)),
                    alpha=float(rng.choice([0.5, 1.0, 3.0])), eps=float(rng.choice([0.0, 0.1])),
                    kind="boltzmann", eos_id=2, ref_params=ref if seed % 2 else None, values=bool(seed % 3 == 0))
    if fn == "sequence_logprobs":
        return dict(params=p, tokens=tokens, mask=mask, prompt_len=pl, alpha=1.0, eps=float(rng.choice([0.0, 0.1])))
    if fn == "reinforce_loss_and_grad":
        kw = dict(params=p, tokens=tokens, mask=mask, prompt_len=pl, reward=rng.standard_normal(B), cfg=None)
        if seed % 2:
            kw["ref_params"] = ref
        else:
            kw["ref_logp"] = np.where(mask > 0, -rng.random((B, T)), 0.0)
        cfg = RL_CONFIGS[(seed // 2) % len(RL_CONFIGS)]
        if cfg is not None:                      # the field's conventions (issue 9) and their inputs
            kw.update({"cfg_" + k: v for k, v in cfg.items()})
            kw["group"] = np.array([7, 7, 7]) if cfg.get("group_scale") == "std" or cfg.get("baseline") == \
                "group_loo" else np.array([0, 1, 1])
            kw["old_logp"] = np.where(mask > 0, -rng.random((B, T)) * 2, 0.0)
            kw["old_values"] = np.where(mask > 0, rng.standard_normal((B, T)), 0.0)
        return kw
    if fn == "sft_loss_and_grad":
        return dict(params=p, tokens=tokens, mask=mask)
    if fn == "reward_forward":
        return dict(params=p, tokens=tokens, mask=mask)
    if fn == "bt_loss_and_grad":
        m2 = mask[::-1].copy()
        return dict(params=p, chosen=tokens, chosen_mask=mask, rejected=np.where(m2 > 0, tokens[::-1], 0),
                    rejected_mask=m2, margin=rng.random(B) if seed % 2 else None)
    if fn == "env":
        return dict(ref_params=ref, kl_coef=0.1, max_len=8, seed=int(seed), prompt=None, action=3, options=None)
    raise ValueError(fn)


def args_of(fn):
    """The arguments a spec may mutate, by kind: (arrays, scalars, params-like)."""
    return {
        "rollout": (("prompt_tokens", "prompt_len", "u"), ("alpha", "eps", "kind", "eos_id", "values"),
                    ("params", "ref_params")),
        "sequence_logprobs": (("tokens", "mask", "prompt_len"), ("alpha", "eps"), ("params",)),
        "reinforce_loss_and_grad": (("tokens", "mask", "prompt_len", "reward", "ref_logp", "group", "old_logp",
                                     "old_values"),
                                    ("cfg.alpha", "cfg.eps", "cfg.gamma", "cfg.beta") + RL_SCALARS,
                                    ("params", "ref_params")),
        "sft_loss_and_grad": (("tokens", "mask"), (), ("params",)),
        "reward_forward": (("tokens", "mask"), (), ("params",)),
        "bt_loss_and_grad": (("chosen", "chosen_mask", "rejected", "rejected_mask", "margin"), (), ("params",)),
        "env": ((), ("action", "seed", "prompt", "max_len", "kl_coef", "options"), ("ref_params",)),
    }[fn]


# ------------------------------------------------------------------------------------ mutations

def _mutate_array(x, mut, val, rng):
    x = np.asarray(x)
    if mut.startswith("dtype:"):
        d = mut[6:]
        if d == "str":
            return x.astype(str)
        with np.errstate(all="ignore"):
            return x.astype(d)
    if mut == "ndim+1":
        return x[..., None]
    if mut == "ndim-1":
        return x[0] if x.ndim else x
    if mut == "scalar":
        return np.asarray(x.flat[0]) if x.size else np.asarray(0)
    if mut == "list":
        return x.tolist()
    if mut == "none":
        return None
    if mut == "shape:row+1":
        return np.concatenate([x, x[:1]], 0) if x.ndim else x
    if mut == "shape:col+1":
        return np.concatenate([x, x[..., :1]], -1) if x.ndim >= 2 else x
    if mut == "shape:col-1":
        return x[..., :-1] if x.ndim >= 1 else x
    if mut == "empty0":
        return x[:0] if x.ndim else x
    if mut == "empty1":
        return x[:, :0] if x.ndim >= 2 else x[:0] if x.ndim else x
    if mut == "fortran":
        return np.asfortranarray(x)
    if mut == "noncontig":
        y = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype) if x.ndim else None
        if y is None:
            return x
        y[..., ::2] = x
        return y[..., ::2]
    if mut == "reversed":
        return x[::-1] if x.ndim else x
    if mut == "readonly":
        y = x.copy()
        y.setflags(write=False)
        return y
    if mut == "value":
        v = VALUES[val]
        y = np.array(x, dtype=np.result_type(x.dtype, np.asarray(v).dtype) if not isinstance(v, (str, type(None), list))
                     else object)
        if y.size:
            idx = tuple(int(rng.integers(0, s)) for s in y.shape)
            with np.errstate(all="ignore"):
                y[idx] = v if not isinstance(v, list) else v[0]
            try:                        # keep the argument's own dtype where the value fits it
                with np.errstate(all="ignore"):
                    z = y.astype(x.dtype)
                if z[idx] == y[idx] or (isinstance(v, float) and v != v and x.dtype.kind == "f"):
                    y = z
            except (TypeError, ValueError, OverflowError):
                pass
        return y
    raise ValueError(mut)


def build(spec):
    """(fn, kwargs) of a spec."""
    fn, dt, seed, mut, arg, val = (spec[k] for k in ("fn", "dt", "seed", "mut", "arg", "val"))
    if fn == "__crash__":
        return fn, {}
    rng = np.random.default_rng(10_000 + seed)
    kw = base(fn, dt, seed)
    if mut == "none":
        return fn, kw
    if mut in ("B=0", "T=0", "T=1"):
        for k, v in list(kw.items()):
            if isinstance(v, np.ndarray) and k not in ("params", "ref_params"):
                if mut == "B=0":
                    kw[k] = v[:0]
                elif v.ndim == 2:
                    kw[k] = v[:, :0] if mut == "T=0" else v[:, :1]
        if mut == "T=1" and "prompt_len" in kw:
            kw["prompt_len"] = np.ones_like(kw["prompt_len"])
        return fn, kw
    if arg.startswith("cfg."):
        kw["cfg_" + arg[4:]] = VALUES[val]
        return fn, kw
    if arg in ("params", "ref_params") and kw.get(arg) is not None:
        p = dict(kw[arg])
        keys = sorted(p)
        key = keys[int(rng.integers(len(keys)))]
        if mut == "pval":
            a = np.array(p[key], dtype=np.float64)
            a.flat[int(rng.integers(a.size))] = VALUES[val]
            with np.errstate(all="ignore"):
                p[key] = a.astype(p[key].dtype)
        elif mut == "pscale":
            with np.errstate(all="ignore"):
                p[key] = (p[key].astype(np.float64) * PSCALES[int(rng.integers(len(PSCALES)))]).astype(p[key].dtype)
        elif mut == "pmissing":
            del p[key]
        elif mut == "pextra":
            p["extra.weight"] = np.zeros((2, 2), p[key].dtype)
        elif mut == "pnotdict":
            p = list(p.values())
        elif mut == "pmixed":
            p[key] = p[key].astype(np.float32 if p[key].dtype == np.float64 else np.float64)
        elif mut == "plist":
            p[key] = p[key].tolist()
        elif mut == "pvocab":                    # a consistent model over a larger vocabulary
            from rlhf_ref import lstm
            p = lstm.init_params(V + 2, E, H, rng, heads=lstm.heads_of(p), dtype=p[key].dtype)
        elif mut.startswith("pdim0:"):           # a model with an empty dimension (V, E or H = 0)
            from rlhf_ref import lstm
            d = {"V": V, "E": E, "H": H, mut[6:]: 0}
            shapes = lstm.param_shapes(d["V"], d["E"], d["H"], lstm.heads_of(p))
            p = {k: np.zeros(s, p[key].dtype) for k, s in shapes.items()}
        else:
            p[key] = _mutate_array(p[key], mut, val, rng)
        kw[arg] = p
        return fn, kw
    if mut == "scalar_value":
        kw[arg] = VALUES[val]
        return fn, kw
    if arg in kw and kw[arg] is not None and not isinstance(kw[arg], (bool, int, float, str)):
        kw[arg] = _mutate_array(kw[arg], mut, val, rng)
    return fn, kw


# ------------------------------------------------------------------------------------ the table

ARRAY_VALUES = ("nan", "inf", "-1", "V", "2**40", "0.5", "2", "1e-45", "-2**63")
# the issue-9 arrays also get huge values (old_logp: exp(logp − old_logp) overflows)
NEW_ARRAYS = ("group", "old_logp", "old_values")
NEW_ARRAY_VALUES = ARRAY_VALUES + ("-inf", "1e300", "-3e38", "3e38", "1e39", "2**63-1", "2**70", "0")
PARAM_VALUES = ("nan", "inf", "-inf", "3e38", "1e300", "1e-45")
PARAM_ARRAY_MUTS = ("dtype:float16", "dtype:int64", "dtype:object", "ndim-1", "ndim+1", "fortran", "noncontig",
                    "shape:row+1", "empty0")


def table(fns=FNS, dtypes=("float32", "float64")):
    """Every mutation of every argument of every entry point ``fns``: the deterministic hostile table."""
    specs = []
    seed = 0

    def add(fn, dt, mut, arg="", val=""):
        nonlocal seed
        specs.append(dict(fn=fn, dt=dt, seed=seed, mut=mut, arg=arg, val=val))
        seed += 1

    for fn in fns:
        arrays, scalars, plike = args_of(fn)
        for dt in dtypes:
            for m in BATCH_MUTS:
                add(fn, dt, m)
            for a in arrays:
                for m in ARRAY_MUTS:
                    vals = NEW_ARRAY_VALUES if a in NEW_ARRAYS else ARRAY_VALUES
                    for v in (vals if m == "value" else ("",)):
                        add(fn, dt, m, a, v)
            for a in scalars:
                for v in VALUES:
                    add(fn, dt, "scalar_value", a, v)
            for a in plike:
                for m in PARAM_MUTS + PARAM_ARRAY_MUTS:
                    for v in (PARAM_VALUES if m == "pval" else ("",) * (3 if m == "pscale" else 1)):
                        add(fn, dt, m, a, v)
    return specs


# ------------------------------------------------------------------------------------ calls

def call(be, fn, kw):
    """Run one entry point of backend module ``be`` (None: the Gymnasium env, reference only)."""
    kw = dict(kw)
    if fn == "__crash__":                    # the runner's own test: a process killed by a signal
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
    if fn == "env":
        from rlhf_ref.envs.text_generation import TextGenerationEnv
        from rlhf_ref.tokenizer import Vocab
        vocab = Vocab("a")                                   # the 4 specials and 'a': V = 5
        env = TextGenerationEnv(prompts=["a", "aa"], vocab=vocab, reward=lambda p, r: float(len(r)),
                                max_len=kw["max_len"], kl_coef=kw["kl_coef"], ref_params=kw["ref_params"])
        opts = kw["options"] if kw["options"] is not None else ({"prompt": kw["prompt"]} if kw["prompt"] is not None else None)
        obs, _ = env.reset(seed=kw["seed"], options=opts)
        out = {"obs": obs}
        for i in range(3):
            obs, r, term, trunc, info = env.step(kw["action"])
            out[f"obs{i}"], out[f"r{i}"] = obs, np.float64(r)
            if term or trunc:
                break
        return out
    if fn == "reinforce_loss_and_grad":
        from rlhf_ref.reinforce import ReinforceConfig
        ck = {k[4:]: kw.pop(k) for k in list(kw) if k.startswith("cfg_")}
        if ck:
            kw["cfg"] = ReinforceConfig(**ck)
    return getattr(be, fn)(**kw)


def _flatten(out, prefix=""):
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(out))
    else:
        return {prefix or "out": out}
    flat = {}
    for k, v in items:
        flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


def compare(got, want, dt):
    """None when ``got`` matches the reference's ``want`` (tests/_tol.py's rule), else what differs."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _tol import assert_close
    g, w = _flatten(got), _flatten(want)
    # compiled backends omit the (B, T, V) scores/logq and the reference-only extras
    missing = sorted(k for k in w if k not in g and k.split(".")[-1] not in ("scores", "logq", "n_real"))
    if missing:
        return f"missing outputs {missing}"
    for k, wv in w.items():
        if k not in g:
            continue
        gv = g[k]
        if isinstance(wv, (int, np.integer)) and not isinstance(wv, bool) and k != "n_real" and np.ndim(wv) == 0:
            wv = np.float64(wv)
        wa, ga = np.asarray(wv), np.asarray(gv)
        if wa.shape != ga.shape:
            return f"{k}: shape {ga.shape} != {wa.shape}"
        if wa.dtype.kind in "iub" or k in ("tokens",):
            if not np.array_equal(wa, ga):
                return f"{k}: {ga.tolist()} != {wa.tolist()}"
            continue
        try:
            fin = np.isfinite(wa.astype(np.float64))
            scale = max(1.0, float(np.max(np.abs(wa[fin])))) if fin.any() else 1.0
            assert_close(ga, wa, dtype=dt, n=4 * T * (E + H + V), name=k, scale=scale)
        except AssertionError as e:
            return str(e)[:300]
    return None


def peak(out, dt):
    """max |x| / finfo(dt).max over the finite float outputs: near 1, a result at the overflow edge."""
    m = 0.0
    for v in _flatten(out).values():
        a = np.asarray(v)
        if a.dtype.kind == "f" and a.size:
            f = np.abs(a[np.isfinite(a)])
            if f.size:
                m = max(m, float(f.max()))
    return m / float(np.finfo(dt).max)


def outcome(fn, be, kw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"s": "ok"}, call(be, fn, kw)
    except Exception as e:   # noqa: BLE001 — every exception is an outcome to compare
        return {"s": "raise", "t": type(e).__name__, "m": str(e)[:400],
                "tb": traceback.format_exc(limit=-1)[-300:]}, None


def main():
    names = [n for n in sys.argv[1].split(",") if n]
    from rlhf_ref import backends
    mods = {n: backends.get(n) for n in names}
    ref = backends.get("numpy")
    specs = json.load(sys.stdin)
    for i, spec in enumerate(specs):
        fn, kw = build(spec)
        if fn == "__crash__":
            call(None, fn, kw)
        r, want = outcome(fn, ref, kw)
        if r["s"] == "ok" and fn not in ("env", "__crash__"):
            r["peak"] = peak(want, np.dtype(spec["dt"]))
        res = {"i": i, "ref": r, "backends": {}}
        if fn not in ("env", "__crash__"):
            for n, m in mods.items():
                if fn not in getattr(m, "IMPLEMENTED", backends.INTERFACE):
                    continue
                o, got = outcome(fn, m, kw)
                if o["s"] == "ok":
                    o["peak"] = peak(got, np.dtype(spec["dt"]))
                if o["s"] == "ok" and r["s"] == "ok":
                    d = compare(got, want, np.dtype(spec["dt"]))
                    if d is not None:
                        o = {"s": "mismatch", "d": d}
                res["backends"][n] = o
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
