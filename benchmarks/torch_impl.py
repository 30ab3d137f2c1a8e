"""PyTorch CPU baselines for the benchmark: the same model, the same sampling rule, the same loss.

Two paths, as in the research anchors: an ``nn.LSTMCell`` loop and ``nn.LSTM`` (oneDNN).
Sampling uses the same inverse-CDF rule and uniforms as rlhf_ref (docs/conventions.md §4), so the
tokens can be checked against the reference before anything is timed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class Policy(nn.Module):
    def __init__(self, params):
        super().__init__()
        V, E = params["embedding.weight"].shape
        H = params["lstm.weight_hh_l0"].shape[1]
        self.embedding = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.head = nn.Linear(H, V)
        self.value = nn.Linear(H, 1)
        self.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}, strict=True)
        self.cell = nn.LSTMCell(E, H)
        with torch.no_grad():
            self.cell.weight_ih.copy_(self.lstm.weight_ih_l0)
            self.cell.weight_hh.copy_(self.lstm.weight_hh_l0)
            self.cell.bias_ih.copy_(self.lstm.bias_ih_l0)
            self.cell.bias_hh.copy_(self.lstm.bias_hh_l0)


def _pick(logits, u, alpha):
    logq = torch.log_softmax(alpha * logits, dim=-1)
    cdf = torch.cumsum(logq.exp(), dim=-1)
    a = (cdf <= u[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
    return a, logq.gather(1, a[:, None])[:, 0]


@torch.no_grad()
def rollout_cell(m, u, alpha=1.0):
    """LSTMCell loop: prompt = BOS, then T−1 sampled tokens."""
    B, T = u.shape
    H = m.cell.hidden_size
    tok = torch.full((B,), 1, dtype=torch.long)
    h = torch.zeros(B, H, dtype=m.head.weight.dtype)
    c = torch.zeros_like(h)
    toks, logps = [tok], []
    for t in range(1, T):
        h, c = m.cell(m.embedding(tok), (h, c))
        tok, lp = _pick(m.head(h), u[:, t], alpha)
        toks.append(tok)
        logps.append(lp)
    return torch.stack(toks, 1), torch.stack(logps, 1)


@torch.no_grad()
def rollout_lstm(m, u, alpha=1.0):
    """nn.LSTM stepped one token at a time (fast at large batch through oneDNN)."""
    B, T = u.shape
    H = m.lstm.hidden_size
    tok = torch.full((B, 1), 1, dtype=torch.long)
    state = (torch.zeros(1, B, H, dtype=m.head.weight.dtype), torch.zeros(1, B, H, dtype=m.head.weight.dtype))
    toks, logps = [tok[:, 0]], []
    for t in range(1, T):
        out, state = m.lstm(m.embedding(tok), state)
        a, lp = _pick(m.head(out[:, 0]), u[:, t], alpha)
        tok = a[:, None]
        toks.append(a)
        logps.append(lp)
    return torch.stack(toks, 1), torch.stack(logps, 1)


def reinforce_step(m, tokens, ref_logp, reward, beta=0.05, value_coef=0.5, use_cell=False):
    """Forward + backward of the default REINFORCE objective (docs/conventions.md §3: k1, γ = 1, reward-to-go,
    value baseline, token mean, c_V = 0.5) for full-length rows with prompt = BOS. Returns the loss."""
    m.zero_grad(set_to_none=True)
    B, T = tokens.shape
    x = m.embedding(tokens)
    if use_cell:
        H = m.cell.hidden_size
        h = torch.zeros(B, H, dtype=x.dtype)
        c = torch.zeros_like(h)
        hs = []
        for t in range(T - 1):
            h, c = m.cell(x[:, t], (h, c))
            hs.append(h)
        hprev = torch.stack(hs, 1)                              # h_0 .. h_{T-2}
    else:
        hprev, _ = m.lstm(x[:, :-1])
    logq = torch.log_softmax(m.head(hprev), -1)                 # scores for tokens 1..T-1
    logp = logq.gather(2, tokens[:, 1:, None])[:, :, 0]
    values = m.value(hprev)[:, :, 0]
    with torch.no_grad():
        r = -beta * (logp - ref_logp[:, 1:])
        r[:, -1] += reward
        G = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
        adv = G - values
    N = B * (T - 1)
    loss = -(adv * logp).sum() / N + value_coef * 0.5 * ((values - G) ** 2).sum() / N
    loss.backward()
    return loss
