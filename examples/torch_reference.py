"""An independent PyTorch implementation of rlhf_ref's objective, checked on the golden vectors.

Written from the conventions (docs/conventions.md) with ``torch.nn`` modules and autograd,
not translated from rlhf_ref's NumPy code: this is what a user's own implementation looks like
when it passes. It reads the golden cases with plain ``json`` + ``numpy.load`` (docs/golden-vectors.md),
computes every output, writes one ``<case>.npz`` per case and runs the verifier::

    rlhf-ref vectors --out golden
    python examples/torch_reference.py golden torch_out        # exit status 0 when every case passes

The only rlhf_ref import is the verifier, at the end. PyTorch is not a dependency of rlhf_ref;
install it with ``pip install torch==2.13.0`` (the CPU build is enough).

The pieces (each a small function, so that the tests can plant a mistake in one of them):

    PolicyNet / RewardNet      nn.Embedding → nn.LSTM(batch_first) → nn.Linear heads, loaded by state-dict name
    token_aligned_heads        scores[:, t] = head(h_{t−1}); values likewise; column 0 and padding are 0
    policy_log_probs           log π = log_softmax(α·z), ε-mixture by logaddexp (sampling and the reference)
    learner_log_probs          the same, for the policy being trained (kept separate on purpose)
    rollout                    inverse-CDF sampling with the given uniforms, EOS ends a row
    decode_log_probs           the rollout's decoding policy: Boltzmann, ε-greedy or greedy
    kl_estimate                k1 = x, k2 = x²/2, k3 = expm1(−x) + x with x = logπ − logπ_ref
    shaped_rewards, discounted_returns, compute_baseline, whiten, aggregation_weights
    gae_returns, group_baseline, group_scale, fixed_len_weights, kl_loss, ppo_clip_loss, clipped_value_loss
                               the field's conventions (GAE, GRPO/RLOO groups, Dr. GRPO, PPO), from the
                               equations of docs/conventions.md §3
    rl_objective               the losses and, by autograd, every gradient of each and of the total
    sft_objective, bt_objective
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS = 0, 1
WHITEN_EPS = 1e-8
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------- models

class PolicyNet(nn.Module):
    """embedding → one-layer LSTM → head (action scores) [+ value or qvalue critic], PyTorch names."""

    def __init__(self, V, E, H, critic=None):
        super().__init__()
        self.embedding = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.head = nn.Linear(H, V)
        self.critic = critic
        if critic == "value":
            self.value = nn.Linear(H, 1)
        elif critic == "qvalue":
            self.qvalue = nn.Linear(H, V)

    def outputs_after(self, tokens):
        """h_t for every position (B, T, H): the LSTM output after reading tokens[:, :t+1]."""
        hs, _ = self.lstm(self.embedding(tokens))
        return hs


class RewardNet(nn.Module):
    """embedding → LSTM → scalar reward read at the last real token."""

    def __init__(self, V, E, H):
        super().__init__()
        self.embedding = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.reward = nn.Linear(H, 1)

    def forward(self, tokens, mask):
        hs, _ = self.lstm(self.embedding(tokens))
        last = mask.sum(dim=1).long() - 1                            # index of the last real token
        h_last = hs[torch.arange(tokens.shape[0]), last]             # (B, H)
        return self.reward(h_last)[:, 0]


def load_lstm_state(state):
    """Hook for the weights of an LSTM as given (PyTorch gate order i, f, g, o: nothing to do)."""
    return state


def load_model(net, arrays, prefix, dtype):
    """Load ``prefix/<name>`` arrays into ``net`` by state-dict name (strict)."""
    state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
    state = load_lstm_state(state)
    net = net.to(dtype)                        # cast first: loading into float32 would round float64 weights
    net.load_state_dict(state, strict=True)
    return net


def build_nets(arrays, cfg, dtype):
    V, E = arrays["policy/embedding.weight"].shape
    H = arrays["policy/lstm.weight_hh_l0"].shape[1]
    critic = "qvalue" if "policy/qvalue.weight" in arrays else "value"
    pol = load_model(PolicyNet(V, E, H, critic), arrays, "policy/", dtype)
    ref = load_model(PolicyNet(V, E, H), arrays, "ref/", dtype)
    for p in ref.parameters():
        p.requires_grad_(False)                                      # frozen
    return pol, ref


# ---------------------------------------------------------------------------------------- policy

def policy_log_probs(z, alpha, eps):
    """log π_ε(·|s) over the last axis: log_softmax(α·z), mixed with ε/V by logaddexp."""
    logp = F.log_softmax(alpha * z, dim=-1)
    if eps > 0:
        V = z.shape[-1]
        logp = torch.logaddexp(logp + math.log1p(-eps), torch.full_like(logp, math.log(eps / V)))
    return logp


def learner_log_probs(z, alpha, eps):
    """The learner's log-distribution (the same function as the sampler's: that is the point)."""
    return policy_log_probs(z, alpha, eps)


def decode_log_probs(z, alpha, eps, kind):
    """The rollout's log-distribution: Boltzmann (as above), or ε-greedy (1−ε)·onehot(argmax z) + ε/V
    (greedy: ε = 0; ties go to the lowest id, torch.argmax's first maximum)."""
    if kind == "boltzmann":
        return policy_log_probs(z, alpha, eps)
    V = z.shape[-1]
    onehot = F.one_hot(torch.argmax(z, dim=-1), V).to(z.dtype)
    return torch.log((1 - eps) * onehot + eps / V)


def entropy(logq):
    q = logq.exp()
    return -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)


def token_aligned_heads(net, tokens, mask):
    """scores (B, T, V) and the critic's output, token-aligned: position t reads h_{t−1}."""
    hs = net.outputs_after(tokens)
    hprev = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1)     # h_{t−1}
    pos = mask.clone()
    pos[:, 0] = 0                                                            # column 0 is never an action
    out = {"scores": net.head(hprev) * pos[..., None]}
    if net.critic == "value":
        out["values"] = net.value(hprev)[..., 0] * pos
    elif net.critic == "qvalue":
        out["qvalues"] = net.qvalue(hprev) * pos[..., None]
    return out, pos


def inverse_cdf(q, u):
    """a = #{k : cdf_k ≤ u}; if rounding leaves u ≥ cdf_{V−1}, the last token with q > 0."""
    cdf = torch.cumsum(q, dim=-1)
    a = (cdf <= u[:, None]).sum(-1)
    V = q.shape[-1]
    last_pos = V - 1 - torch.argmax((q > 0).flip(-1).to(torch.int64), dim=-1)
    return torch.where(a >= V, last_pos, a)


@torch.no_grad()
def rollout(net, prompt_tokens, prompt_len, u, alpha, eps, eos_id, kind="boltzmann"):
    """Sample responses token by token from the given uniforms (u[:, t] draws token t)."""
    B, T = prompt_tokens.shape
    t_idx = torch.arange(T)[None, :]
    tokens = torch.where(t_idx < prompt_len[:, None], prompt_tokens, torch.zeros_like(prompt_tokens))
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[:, 0] = 1
    amask = torch.zeros(B, T, dtype=torch.int64)
    logp = torch.zeros(B, T, dtype=u.dtype)
    done = torch.zeros(B, dtype=torch.bool)
    state = None
    for t in range(1, T):
        out, state = net.lstm(net.embedding(tokens[:, t - 1:t]), state)      # feed token t−1: h_{t−1}
        lq = decode_log_probs(net.head(out[:, 0]), alpha, eps, kind)
        live = ~done
        in_prompt = t < prompt_len
        act = live & ~in_prompt
        a = inverse_cdf(lq.exp(), u[:, t])
        tokens[:, t] = torch.where(act, a, torch.where(live & in_prompt, tokens[:, t], torch.zeros_like(a)))
        mask[:, t] = live.long()
        amask[:, t] = act.long()
        logp[:, t] = torch.where(act, lq.gather(1, tokens[:, t:t + 1])[:, 0], torch.zeros_like(logp[:, t]))
        done = done | (act & (tokens[:, t] == eos_id))
    return {"rollout/tokens": tokens, "rollout/mask": mask, "rollout/action_mask": amask, "rollout/logp": logp}


# ---------------------------------------------------------------------------------------- RL pieces

def kl_estimate(logp, ref_logp, kind):
    """Per-token KL estimate from x = logπ − logπ_ref; a constant (the log-probs are detached)."""
    x = logp.detach() - ref_logp.detach()
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        return torch.expm1(-x) + x
    raise ValueError(f"torch_reference.py has no formula for KL estimator {kind!r}")


def shaped_rewards(kl, R, am, beta):
    """−β·k at every action, plus R at each row's last action (rows without an action get nothing)."""
    r = -beta * kl * am
    has = am.sum(1) > 0
    T = am.shape[1]
    last = T - 1 - torch.argmax(am.flip(1), dim=1)
    bonus = torch.zeros_like(r)
    rows = torch.nonzero(has)[:, 0]
    bonus[rows, last[rows]] = R[rows]
    return r + bonus


def discounted_returns(r, am, gamma, kind):
    """reward-to-go G_t = r_t + γ G_{t+1} over actions, or 'total' Σ γ^j r_j at every action."""
    B, T = r.shape
    act = am > 0
    G = torch.zeros_like(r)
    if kind == "rtg":
        g = torch.zeros(B, dtype=r.dtype)
        for t in reversed(range(T)):
            g = torch.where(act[:, t], r[:, t] + gamma * g, g)
            G[:, t] = torch.where(act[:, t], g, torch.zeros_like(g))
        return G
    total = torch.zeros(B, dtype=r.dtype)
    disc = torch.ones(B, dtype=r.dtype)
    for t in range(T):
        total = total + torch.where(act[:, t], disc * r[:, t], torch.zeros_like(total))
        disc = torch.where(act[:, t], disc * gamma, disc)
    return total[:, None] * am


def compute_baseline(kind, G, am, values=None, qvalues=None, logq=None):
    if kind == "none":
        return torch.zeros_like(G)
    if kind == "value":
        return values.detach() * am
    if kind == "qvalue":
        return (logq.detach().exp() * qvalues.detach()).sum(-1) * am
    N = am.sum()
    if kind == "mean":
        return (G * am).sum() / N * am
    n_row = am.sum(1)
    s_row = (G * am).sum(1)
    b_row = (s_row.sum() - s_row) / (N - n_row).clamp(min=1)
    return b_row[:, None] * am


def whiten(A, am, kind, shift_mean):
    if kind == "off":
        return A
    x = A.detach()[am > 0]                                        # the statistics are constants
    mu = x.mean()
    var = x.var(correction=1 if kind == "bessel" else 0)
    out = (A - mu) / torch.sqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mu
    return out * am


def aggregation_weights(am, kind):
    N = am.sum()
    n_row = am.sum(1, keepdim=True)
    n_rows = (n_row > 0).sum()
    if kind == "token_mean":
        return am / N
    if kind == "seq_sum":
        return am / n_rows
    return am / n_row.clamp(min=1) / n_rows


def gae_returns(r, values, am, gamma, lam):
    """GAE over each row's actions: δ_j = r_j + γ·V_{j+1} − V_j (V after the last action: 0),
    A_j = Σ_l (γλ)^l δ_{j+l}; the returns are A + V (V a constant)."""
    B, T = r.shape
    V = values.detach() * am
    G = torch.zeros_like(r)
    for b in range(B):
        acts = torch.nonzero(am[b] > 0)[:, 0].tolist()
        a_next, v_next = 0.0, 0.0
        for t in reversed(acts):
            delta = r[b, t] + gamma * v_next - V[b, t]
            a_next = delta + gamma * lam * a_next
            v_next = V[b, t]
            G[b, t] = a_next + V[b, t]
    return G


def sequence_returns(G, am):
    """S_i: each row's return at its first action (rows without an action: 0)."""
    first = torch.argmax((am > 0).to(torch.int64), dim=1)
    return G.gather(1, first[:, None])[:, 0] * (am.sum(1) > 0)


def group_baseline(kind, G, am, group):
    """group_mean: the mean of S over the rows of the row's group that have an action (itself
    included); group_loo: over the others. Broadcast to the row's actions."""
    S = sequence_returns(G, am).detach()
    has = am.sum(1) > 0
    B = G.shape[0]
    b = torch.zeros(B, dtype=G.dtype)
    for i in range(B):
        mates = has & (group == group[i])
        if kind == "group_loo":
            mates[i] = False
        if has[i]:
            b[i] = S[mates].mean()
    return b[:, None] * am


def group_scale(A, G, am, group, eps):
    """GRPO: A / (σ_g + eps), σ_g the unbiased std of S over the row's group (rows with an action)."""
    S = sequence_returns(G, am).detach()
    has = am.sum(1) > 0
    sd = torch.ones(G.shape[0], dtype=G.dtype)
    for i in range(G.shape[0]):
        if has[i]:
            sd[i] = S[has & (group == group[i])].std(correction=1)
    return A / (sd[:, None] + eps) * am


def fixed_len_weights(am, norm_len):
    """Dr. GRPO: m / (B·L), L = norm_len, or the array width when norm_len is 0."""
    B, T = am.shape
    return am / (B * (norm_len if norm_len > 0 else T))


def kl_loss(w, logp, ref_logp, kind, beta):
    """β·Σ w·k(x), x = logπ − logπ_ref NOT detached (the penalty in the loss, GRPO's placement)."""
    x = logp - ref_logp.detach()
    k = {"k1": x, "k2": 0.5 * x * x, "k3": torch.expm1(-x) + x}[kind]
    return beta * (w * k).sum()


def ppo_clip_loss(w, adv, logp, old_logp, clip_low, clip_high, am):
    """Σ w·−min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high)·A), ρ = exp(logπ − logπ_old); ρ (B, T)."""
    ratio = torch.exp(logp - old_logp) * am
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    return -(w * surr).sum(), ratio


def clipped_value_loss(w, pred, G, old_values, clip, coef):
    """c_V·½·Σ w·max((V − G)², (V_old + clip(V − V_old, ±c) − G)²)."""
    v_clip = old_values + torch.clamp(pred - old_values, -clip, clip)
    return coef * 0.5 * (w * torch.maximum((pred - G) ** 2, (v_clip - G) ** 2)).sum()


def pg_loss(w, adv, logp):
    """L_pg = −Σ w·A·log π (minimised)."""
    return -(w * adv * logp).sum()


def grads_of(loss, named, prefix):
    """d loss / d param for every named parameter (zeros where the loss does not depend on it)."""
    ps = [p for _, p in named]
    if not loss.requires_grad:
        return {f"{prefix}{n}": torch.zeros_like(p) for n, p in named}
    gs = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
    return {f"{prefix}{n}": (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, gs)}


def rl_objective(pol, ref, tokens, mask, prompt_len, R, cfg, group=None, old_logp=None, old_values=None):
    """Every RL intermediate in data-flow order, the losses and their gradients.

    The stop-gradients live where the constants are made: kl_estimate (β·k), compute_baseline (b),
    whiten (μ, σ); R is data. So A and G carry no gradient, and the entropy keeps its own."""
    get = lambda k, d: cfg.get(k, d)  # noqa: E731  (a manifest of schema 1 has no issue-9 switches)
    alpha, eps = cfg["alpha"], cfg["eps"]
    T = tokens.shape[1]
    am = mask * (torch.arange(T)[None, :] >= prompt_len[:, None]).to(mask.dtype)        # (B, T)
    heads, pos = token_aligned_heads(pol, tokens, mask)
    z = heads["scores"]
    logq = learner_log_probs(z, alpha, eps) * pos[..., None]
    logp = logq.gather(2, tokens[..., None])[..., 0] * am
    with torch.no_grad():
        rheads, _ = token_aligned_heads(ref, tokens, mask)
        ref_logp = policy_log_probs(rheads["scores"], alpha, eps).gather(2, tokens[..., None])[..., 0] * am
    ent = entropy(learner_log_probs(z, alpha, eps)) * am
    kl = kl_estimate(logp, ref_logp, cfg["kl"]) * am
    in_loss = get("kl_in", "reward") == "loss"
    rewards = shaped_rewards(kl, R, am, 0.0 if in_loss else cfg["beta"])
    if cfg["returns"] == "gae":
        G = gae_returns(rewards, heads["values"], am, cfg["gamma"], cfg["lam"])
    else:
        G = discounted_returns(rewards, am, cfg["gamma"], cfg["returns"])
    if cfg["baseline"] in ("group_mean", "group_loo"):
        b = group_baseline(cfg["baseline"], G, am, group)
    else:
        b = compute_baseline(cfg["baseline"], G, am, heads.get("values"), heads.get("qvalues"), logq)
    adv = (G - b) * am
    if get("group_scale", "off") == "std":
        adv = group_scale(adv, G, am, group, cfg["group_eps"])
    adv = whiten(adv, am, cfg["whiten"], cfg["shift_mean"])
    if cfg["aggregation"] == "fixed_len":
        w = fixed_len_weights(am, cfg["norm_len"])
    else:
        w = aggregation_weights(am, cfg["aggregation"])
    if "values" in heads:
        pred = heads["values"] * am
    else:
        pred = heads["qvalues"].gather(2, tokens[..., None])[..., 0] * am
    ratio = None
    if get("surrogate", "reinforce") == "ppo_clip":
        old = logp.detach() if old_logp is None else old_logp
        loss_pg, ratio = ppo_clip_loss(w, adv, logp, old, cfg["clip_low"], cfg["clip_high"], am)
    else:
        loss_pg = pg_loss(w, adv, logp)
    loss_ent = -cfg["entropy_coef"] * (w * ent).sum()
    if get("value_clip", 0.0) > 0:
        loss_value = clipped_value_loss(w, pred, G, old_values, cfg["value_clip"], cfg["value_coef"])
    else:
        loss_value = cfg["value_coef"] * 0.5 * (w * (pred - G) ** 2).sum()
    loss_kl = kl_loss(w, logp, ref_logp, cfg["kl"], cfg["beta"]) if in_loss else None
    loss = loss_pg + loss_ent + loss_value + (loss_kl if in_loss else 0.0)
    out = {"action_mask": am.long(), "scores": z, "logq": logq, "logp": logp, "ref_logp": ref_logp,
           "entropy": ent, "kl": kl, "rewards": rewards, "returns": G}
    out.update({k: v for k, v in heads.items() if k != "scores"})
    out.update({"baseline": b, "advantages": adv})
    if ratio is not None:
        out["ratio"] = ratio
    out.update({"weights": w, "loss_pg": loss_pg, "loss_ent": loss_ent, "loss_value": loss_value})
    if in_loss:
        out["loss_kl"] = loss_kl
    out["loss"] = loss
    named = list(pol.named_parameters())
    terms = (("loss_pg", loss_pg), ("loss_ent", loss_ent), ("loss_value", loss_value)) + (
        (("loss_kl", loss_kl),) if in_loss else ()) + (("loss", loss),)
    for name, L in terms:
        out.update(grads_of(L, named, f"grad/{name}/policy/"))
    return out


def sft_objective(pol, tokens, mask):
    """Next-token cross-entropy (α = 1), token mean over real positions t ≥ 1."""
    heads, pos = token_aligned_heads(pol, tokens, mask)
    lp = F.log_softmax(heads["scores"], dim=-1).gather(2, tokens[..., None])[..., 0] * pos
    loss = -lp.sum() / pos.sum()
    out = {"sft_logp": lp, "sft_loss": loss}
    out.update(grads_of(loss, list(pol.named_parameters()), "grad/sft_loss/policy/"))
    return out


def bt_objective(rm, chosen, cmask, rejected, rmask):
    """Bradley–Terry: mean over pairs of −log σ(r_chosen − r_rejected)."""
    rc, rr = rm(chosen, cmask), rm(rejected, rmask)
    loss = F.softplus(-(rc - rr)).mean()
    out = {"reward_chosen": rc, "reward_rejected": rr, "bt_loss": loss}
    out.update(grads_of(loss, list(rm.named_parameters()), "grad/bt_loss/rm/"))
    return out


# ---------------------------------------------------------------------------------------- a case

def run_case(entry, arrays):
    """All outputs of one golden case as NumPy arrays, by golden name."""
    cfg = entry["config"]
    dt = DTYPES[cfg["dtype"]]
    T_ = lambda k: torch.from_numpy(np.array(arrays[k]))  # noqa: E731
    fl = lambda k: T_(k).to(dt)                           # noqa: E731
    pol, ref = build_nets(arrays, cfg, dt)
    out = {}
    if "rollout" in entry["sections"]:
        out.update(rollout(pol, T_("rollout/prompt_tokens"), T_("rollout/prompt_len"), fl("rollout/u"),
                           cfg["alpha"], cfg["eps"], cfg["eos_id"], cfg.get("policy_kind", "boltzmann")))
    if "rl" in entry["sections"]:
        mask = fl("mask")
        opt = {k: (T_(k) if k == "group" else fl(k)) for k in ("group", "old_logp", "old_values") if k in arrays}
        out.update(rl_objective(pol, ref, T_("tokens"), mask, T_("prompt_len"), fl("reward"), cfg, **opt))
    if "sft" in entry["sections"]:
        out.update(sft_objective(pol, T_("tokens"), fl("mask")))
    if "rm" in entry["sections"]:
        V, E = arrays["rm/embedding.weight"].shape
        H = arrays["rm/lstm.weight_hh_l0"].shape[1]
        rm = load_model(RewardNet(V, E, H), arrays, "rm/", dt)
        out.update(bt_objective(rm, T_("chosen"), T_("chosen_mask"), T_("rejected"), T_("rejected_mask")))
    return {k: v.detach().numpy() for k, v in out.items()}


def load_golden(folder):
    """(manifest, {case: arrays}) read with json and numpy only."""
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["schema"] == "rlhf_ref.golden_vectors" and manifest["schema_version"] in (1, 2), manifest["schema"]
    cases = {}
    for e in manifest["cases"]:
        with np.load(os.path.join(folder, e["file"]), allow_pickle=False) as z:
            cases[e["name"]] = {k: z[k] for k in z.files}
    return manifest, cases


def run_all(folder, names=None):
    """{case: outputs} for every case (or the named ones)."""
    manifest, cases = load_golden(folder)
    return {e["name"]: run_case(e, cases[e["name"]]) for e in manifest["cases"] if names is None or e["name"] in names}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python examples/torch_reference.py GOLDEN_DIR OUT_DIR", file=sys.stderr)
        return 2
    golden, out_dir = argv
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    outs = run_all(golden)
    for name, arrays in outs.items():
        np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
    from rlhf_ref.verify import verify                   # the one rlhf_ref import: the checker
    report = verify(golden, out_dir)
    print(report.format())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
