"""Cross-check against PyTorch in float64: an independent implementation of the same math.

The reference's parameter dict is loaded into ``nn.Embedding`` + ``nn.LSTM(batch_first=True)`` +
``nn.Linear`` heads by their state-dict names (``load_state_dict(strict=True)``: the names and shapes
of docs/conventions.md §2 are exactly PyTorch's). The torch side is written here from docs/conventions.md §3, not
translated from reinforce.py: each row runs through ``nn.LSTM`` on its own real prefix (so padding is
simply absent), token alignment is done by indexing ``out[t − 1]``, the stop-gradients are
``.detach()``, and autograd gives the gradients. Scores, values, log-probs (α, ε variants), entropy,
the SFT loss, every REINFORCE loss piece, the Bradley–Terry loss, and the gradient of every
parameter must agree to the float64 tolerance of tests/_tol.py (≈1e-13 relative for these sizes).

PyTorch is a test-only dependency (CI installs torch==2.13.0); without it this module is skipped.
"""

import numpy as np
import pytest

from _tol import assert_close
from rlhf_ref import lstm, model, policy, reinforce, reward_model, sft

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
nn = torch.nn
F = torch.nn.functional

V, E, H = 7, 4, 5
T = 7
# rounding steps behind one output: T steps of the recurrence, each a dot product of length E + H,
# then a head of length H and a softmax over V; gradients add the B·T positions (4·7)
N_FWD = T * (E + H) + H + V
N_GRAD = N_FWD + 4 * T


class Net(nn.Module):
    """The module of docs/conventions.md §2: its state-dict names are the reference's parameter keys."""

    def __init__(self, heads):
        super().__init__()
        self.embedding = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        for h in heads:
            setattr(self, h, nn.Linear(H, {"head": V, "value": 1, "qvalue": V, "reward": 1}[h]))


def to_torch(p):
    heads = [h for h in ("head", "value", "qvalue", "reward") if f"{h}.weight" in p]
    net = Net(heads).double()
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in p.items()}, strict=True)
    return net


def torch_grads(net):
    return {k: (v.grad.numpy() if v.grad is not None else np.zeros(tuple(v.shape))) for k, v in net.named_parameters()}


def params(seed, heads):
    p = lstm.init_params(V, E, H, np.random.default_rng(seed), heads=heads)
    return {k: v * (1.0 if k == "embedding.weight" else 1.7) for k, v in p.items()}


def batch():
    tokens = np.array([[1, 4, 5, 2, 3, 6, 2],
                       [1, 3, 4, 6, 5, 0, 0],
                       [1, 5, 4, 0, 0, 0, 0],
                       [1, 6, 5, 4, 0, 0, 0]])
    mask = (np.arange(T)[None, :] < np.array([7, 5, 3, 4])[:, None]).astype(float)
    return tokens, mask, np.array([1, 2, 3, 1])


def rows_forward(net, tokens, mask):
    """Per row: the LSTM over the row's real prefix. Returns a list of (out (n, H), h_n (H,), c_n (H,))."""
    res = []
    for b in range(tokens.shape[0]):
        n = int(mask[b].sum())
        x = net.embedding(torch.from_numpy(tokens[b, :n]))[None]          # (1, n, E)
        out, (h_n, c_n) = net.lstm(x)
        res.append((out[0], h_n[0, 0], c_n[0, 0]))
    return res


def log_policy(z, alpha, eps):
    """log π_ε = logaddexp(log1p(−ε) + log_softmax(α z), log(ε/V)); ε = 0: log_softmax (docs/conventions.md §3)."""
    lp = F.log_softmax(alpha * z, dim=-1)
    if eps == 0:
        return lp
    with np.errstate(divide="ignore"):                                   # ε = 1: log1p(−1) = −inf
        log_keep = np.log1p(-eps)
    return torch.logaddexp(lp + log_keep, torch.full_like(lp, np.log(eps / z.shape[-1])))


# ---------------------------------------------------------------------------------------------

def test_state_dict_names_and_shapes_are_pytorchs():
    p = params(0, ("head", "value", "qvalue"))
    net = Net(("head", "value", "qvalue")).double()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: v.shape for k, v in p.items()}
    assert lstm.param_shapes(V, E, H, ("head", "value", "qvalue")) == {k: v.shape for k, v in p.items()}


def test_lstm_hidden_states_and_final_state():
    p = params(1, ())
    tokens, mask, _ = batch()
    net = to_torch(p)
    hs, cache = lstm.forward(p, tokens, mask)
    hf, cf = lstm.final_state(cache)
    with torch.no_grad():
        rows = rows_forward(net, tokens, mask)
        # pack_padded_sequence, the other standard way of running padded rows, agrees with the rows
        lengths = mask.sum(1).astype(np.int64)
        packed = nn.utils.rnn.pack_padded_sequence(net.embedding(torch.from_numpy(tokens)), torch.from_numpy(lengths),
                                                   batch_first=True, enforce_sorted=False)
        out_p, (h_p, c_p) = net.lstm(packed)
        out_p, _ = nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=T)
    for b, (out, h_n, c_n) in enumerate(rows):
        n = out.shape[0]
        assert_close(hs[b, :n], out.numpy(), n=N_FWD, name=f"hs row {b}")
        assert not hs[b, n:].any()                                       # 0 on padding
        assert_close(hf[b], h_n.numpy(), n=N_FWD, name=f"h_final row {b}")
        assert_close(cf[b], c_n.numpy(), n=N_FWD, name=f"c_final row {b}")
    assert_close(hs, out_p.numpy(), n=N_FWD, name="hs vs packed")
    assert_close(hf, h_p[0].numpy(), n=N_FWD, name="h_final vs packed")


@pytest.mark.parametrize("alpha,eps", [(1.0, 0.0), (2.3, 0.0), (0.5, 0.2), (1.4, 1.0)])
def test_scores_values_logprobs_entropy(alpha, eps):
    p = params(2, ("head", "value", "qvalue"))
    tokens, mask, pl = batch()
    net = to_torch(p)
    out, _ = model.forward(p, tokens, mask)
    logq = policy.logprobs(out["scores"], alpha, eps)
    ent = policy.entropy(logq)
    lp = reinforce.sequence_logprobs(p, tokens, mask, pl, alpha, eps)
    with torch.no_grad():
        rows = rows_forward(net, tokens, mask)
    for b, (o, _, _) in enumerate(rows):
        n = o.shape[0]
        hprev = o[:n - 1]                                          # h_{t−1} for t = 1..n−1
        z = net.head(hprev)
        lq = log_policy(z, alpha, eps)
        assert_close(out["scores"][b, 1:n], z.detach().numpy(), n=N_FWD, name="scores")
        assert_close(out["values"][b, 1:n], net.value(hprev)[:, 0].detach().numpy(), n=N_FWD, name="values")
        assert_close(out["qvalues"][b, 1:n], net.qvalue(hprev).detach().numpy(), n=N_FWD, name="qvalues")
        assert not out["scores"][b, 0].any() and not out["scores"][b, n:].any()
        assert_close(logq[b, 1:n], lq.detach().numpy(), n=N_FWD, name="logq")
        h_t = -(lq.exp() * lq).sum(-1)
        assert_close(ent[b, 1:n], h_t.detach().numpy(), n=N_FWD, name="entropy")
        a = torch.from_numpy(tokens[b, 1:n])
        taken = lq.gather(-1, a[:, None])[:, 0].detach().numpy()
        t_act = np.arange(1, n) >= pl[b]
        assert_close(lp[b, 1:n], np.where(t_act, taken, 0.0), n=N_FWD, name="sequence_logprobs")


def test_sft_loss_and_grads():
    p = params(3, ("head",))
    tokens, mask, _ = batch()
    out, g = sft.loss_and_grad(p, tokens, mask)
    net = to_torch(p)
    rows = rows_forward(net, tokens, mask)
    logits = torch.cat([net.head(o[:-1]) for o, _, _ in rows])            # predicts tokens 1..n−1
    targets = torch.cat([torch.from_numpy(tokens[b, 1:int(mask[b].sum())]) for b in range(len(rows))])
    loss = F.cross_entropy(logits, targets)                               # mean over the N_real targets
    loss.backward()
    assert_close(out["loss"], loss.item(), n=N_FWD, name="sft loss")
    tg = torch_grads(net)
    for k in p:
        assert_close(g[k], tg[k], n=N_GRAD, name=f"sft grad {k}")


def torch_reinforce(net, ref_net, tokens, mask, pl, R, cfg):
    """docs/conventions.md §3 in torch, per row. Returns the loss pieces (tensors) and per-token arrays."""
    B = tokens.shape[0]
    rows = rows_forward(net, tokens, mask)
    with torch.no_grad():
        ref_rows = rows_forward(ref_net, tokens, mask)
    logp, ent, pred, base_state, lengths = [], [], [], [], []
    ref_logp = []
    for b in range(B):
        n = rows[b][0].shape[0]
        hprev = rows[b][0][pl[b] - 1:n - 1]                                # states s_t of the actions t = pl..n−1
        a = torch.from_numpy(tokens[b, pl[b]:n])
        lq = log_policy(net.head(hprev), cfg.alpha, cfg.eps)
        logp.append(lq.gather(-1, a[:, None])[:, 0])
        ent.append(-(lq.exp() * lq).sum(-1))
        lr = log_policy(ref_net.head(ref_rows[b][0][pl[b] - 1:n - 1]), cfg.alpha, cfg.eps)
        ref_logp.append(lr.gather(-1, a[:, None])[:, 0])
        if cfg.baseline == "qvalue":
            q = net.qvalue(hprev)
            pred.append(q.gather(-1, a[:, None])[:, 0])                    # Q(s_t, a_t)
            base_state.append((lq.exp() * q).sum(-1).detach())             # Σ_a π_ε(a|s_t) Q(s_t, a)
        else:
            v = net.value(hprev)[:, 0]
            pred.append(v)
            base_state.append(v.detach())
        lengths.append(n - pl[b])
    # rewards, returns: constants
    G = []
    for b in range(B):
        x = (logp[b] - ref_logp[b]).detach()
        k = {"k1": x, "k2": x ** 2 / 2, "k3": torch.expm1(-x) + x}.get(cfg.kl)
        if k is None:
            raise ValueError(f"the torch cross-check has no formula for KL estimator {cfg.kl!r}: write it out here")
        r = -cfg.beta * k
        if lengths[b]:
            r = r.clone()
            r[-1] += R[b]
        g = torch.zeros_like(r)
        if cfg.returns == "rtg":
            acc = 0.0
            for t in reversed(range(lengths[b])):
                acc = r[t] + cfg.gamma * acc
                g[t] = acc
        else:
            g[:] = sum(cfg.gamma ** j * r[j] for j in range(lengths[b])) if lengths[b] else 0.0
        G.append(g)
    allG = torch.cat(G)
    nonempty = [b for b in range(B) if lengths[b] > 0]
    A = []
    for b in range(B):
        if cfg.baseline in ("value", "qvalue"):
            bl = base_state[b]
        elif cfg.baseline == "mean":
            bl = allG.mean()
        elif cfg.baseline == "loo":
            bl = torch.cat([G[c] for c in range(B) if c != b]).mean()
        else:
            bl = 0.0
        A.append(G[b] - bl)
    if cfg.whiten != "off":
        allA = torch.cat(A)
        mu, var = allA.mean(), allA.var(unbiased=(cfg.whiten == "bessel"))
        A = [(a - mu) * torch.rsqrt(var + 1e-8) + (0.0 if cfg.shift_mean else mu) for a in A]
    N = sum(lengths)
    if cfg.aggregation == "token_mean":
        wts = [torch.full((n,), 1.0 / N, dtype=torch.float64) for n in lengths]
    elif cfg.aggregation == "seq_sum":
        wts = [torch.full((n,), 1.0 / len(nonempty), dtype=torch.float64) for n in lengths]
    else:
        wts = [torch.full((n,), 1.0 / (n * len(nonempty)) if n else 0.0, dtype=torch.float64) for n in lengths]
    l_pg = -sum((w * a.detach() * lp).sum() for w, a, lp in zip(wts, A, logp))
    l_ent = -cfg.entropy_coef * sum((w * h).sum() for w, h in zip(wts, ent))
    l_val = cfg.value_coef * 0.5 * sum((w * (pr - g) ** 2).sum() for w, pr, g in zip(wts, pred, G))
    return {"loss_pg": l_pg, "loss_ent": l_ent, "loss_value": l_val, "logp": logp, "ref_logp": ref_logp,
            "returns": G, "advantages": A, "entropy": ent}


RCONFIGS = [
    reinforce.ReinforceConfig(),
    reinforce.ReinforceConfig(alpha=1.6, eps=0.2, gamma=0.9, beta=0.2, kl="k3", returns="total", baseline="qvalue",
                              whiten="population", aggregation="seq_mean", entropy_coef=0.1, value_coef=1.0),
    reinforce.ReinforceConfig(alpha=0.8, gamma=0.95, beta=0.1, kl="k2", baseline="mean", whiten="bessel",
                              shift_mean=False, aggregation="seq_sum", entropy_coef=0.05),
    reinforce.ReinforceConfig(eps=0.1, beta=0.3, kl="k1", returns="total", baseline="loo", aggregation="token_mean"),
    reinforce.ReinforceConfig(alpha=2.0, gamma=0.8, beta=0.05, kl="k3", baseline="none", whiten="population",
                              shift_mean=False, aggregation="seq_sum", entropy_coef=0.2, value_coef=0.3),
]


@pytest.mark.parametrize("cfg", RCONFIGS, ids=lambda c: f"{c.baseline}-{c.returns}-{c.kl}-{c.whiten}-{c.aggregation}")
def test_reinforce_loss_pieces_and_grads(cfg):
    heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
    p, ref = params(10, heads), params(11, ("head",))
    tokens, mask, pl = batch()
    R = np.array([1.5, -0.7, 3.0, 0.4])
    out, g = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref)
    net, ref_net = to_torch(p), to_torch(ref)
    tt = torch_reinforce(net, ref_net, tokens, mask, pl, R, cfg)
    am = out["action_mask"] > 0
    for k in ("logp", "ref_logp", "returns", "advantages", "entropy"):
        want = np.concatenate([x.detach().numpy() for x in tt[k]])
        assert_close(out[k][am], want, n=N_FWD, scale=max(1.0, np.max(np.abs(want))), name=k)
    for k in ("loss_pg", "loss_ent", "loss_value"):       # scale: the summed terms are below 10 in size
        assert_close(out[k], float(tt[k].detach()), n=N_GRAD, scale=10.0, name=k)
    (tt["loss_pg"] + tt["loss_ent"] + tt["loss_value"]).backward()
    tg = torch_grads(net)
    for k in p:
        assert_close(g[k], tg[k], n=N_GRAD, scale=max(1.0, np.max(np.abs(tg[k]))), name=f"grad {k}")


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_and_grads(with_margin):
    p = params(20, ("reward",))
    chosen, cmask, _ = batch()
    rejected = np.array([[1, 5, 5, 2, 0, 0, 0], [1, 3, 0, 0, 0, 0, 0], [1, 4, 4, 4, 6, 4, 2], [1, 2, 3, 0, 0, 0, 0]])
    rmask = (rejected > 0).astype(float)
    margin = np.array([0.5, -0.2, 1.0, 0.0]) if with_margin else None
    out, g = reward_model.bt_loss_and_grad(p, chosen, cmask, rejected, rmask, margin=margin)
    net = to_torch(p)

    def rewards(tok, m):
        return torch.stack([net.reward(h_n)[0] for _, h_n, _ in rows_forward(net, tok, m)])

    r_c, r_r = rewards(chosen, cmask), rewards(rejected, rmask)
    delta = r_c - r_r - (torch.from_numpy(margin) if with_margin else 0.0)
    loss = -F.logsigmoid(delta).mean()
    loss.backward()
    assert_close(out["reward_chosen"], r_c.detach().numpy(), n=N_FWD, name="r(chosen)")
    assert_close(out["reward_rejected"], r_r.detach().numpy(), n=N_FWD, name="r(rejected)")
    assert_close(out["loss"], loss.item(), n=N_FWD, name="bt loss")
    tg = torch_grads(net)
    for k in p:
        assert_close(g[k], tg[k], n=N_GRAD, name=f"bt grad {k}")
    # torch agrees that the reward offset gets no gradient (up to rounding: the two sums cancel)
    assert abs(tg["reward.bias"][0]) < 1e-15
