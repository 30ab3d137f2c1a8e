"""The simulated annotator: a known *true* preference over texts, seen only through noisy judgements.

The demo's stand-in for a person. Its true reward of a text x (the full line, ``prompt +
response``) is the sentiment of the words used, if x is a sentence of the corpus grammar
(``rlhf_ref.data.corpus.parse``), and a penalty otherwise::

    r(x) = tanh( Σ_{w in x} valence(w) )            if x is well-formed        ∈ (−1, 1)
    r(x) = −1 − unknown(x)                          otherwise                  ∈ [−2, −1]

``valence`` is ``corpus.VALENCE`` (positive adjectives/adverbs 0.5..1, neutral ones small, negative
−1..−0.5; every other word 0) and ``unknown(x)`` is the share of x's words that are not in the
grammar's lexicon (1 when x has no word). So every ill-formed text — a word the grammar doesn't
know, a missing final period, a repeated adjective, a response cut off at the maximum length —
ranks below every well-formed one, and degenerate outputs are never rewarded.

Judgements, all randomness from an explicit ``np.random.Generator``:

- ``compare(a, b, rng)``: Bradley–Terry with temperature τ (default 0.05): returns 1 (a preferred)
  with probability ``σ((r(a) − r(b))/τ)`` and 0 (b preferred) otherwise, using exactly one
  ``rng.random()`` per judgement (``compare_many`` draws ``rng.random(n)``: the same stream).
- ``rate(text, rng)``: ``clip(round(3 + 2·r(x) + s·ξ), 1, 5)`` with ξ ~ N(0, 1), s = rating_noise
  (default 0.5); one ``rng.standard_normal()`` per rating; halves round up.
  At τ = 0.05, on pairs of corpus lines that share a prompt, the labels agree with the true
  ranking 93% of the time (``label_accuracy_ceiling``: the best any reward model can score
  against these labels); at τ = 0.1, 88%; at 0.2, 82%.
- ``true_win(a, b)``: 1 if r(a) > r(b), 0.5 if equal (within 1e-12), 0 otherwise — for evaluation.

The true preference stays hidden from training: reward models and policies may only use
``compare``/``compare_many``/``label_pairs``/``rate`` (the judgements a person would give).
``true_reward``, ``true_rewards`` and ``true_win`` exist for evaluation and for the metrics that
show reward over-optimisation (the learned reward beside the true one); no training code path
reads them. Every method takes an optional ``prompt`` that is prepended to the text(s) judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validate import check_range
from .data.corpus import VALENCE, WORDS, parse, words
from .preferences import Preference, Rating

__all__ = ["SimulatedAnnotator", "sigmoid"]


def sigmoid(x):
    """σ(x) = 1/(1 + e^{−x}) for a float, without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _texts(name, xs):
    if isinstance(xs, str) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{name} must be a sequence of strings, got {type(xs).__name__}")
    xs = list(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(x).__name__}")
    return xs


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


@dataclass(frozen=True)
class SimulatedAnnotator:
    """A simulated person whose true reward is sentiment on well-formed grammar sentences."""

    temperature: float = 0.05
    """Bradley–Terry temperature τ > 0: P(a preferred) = σ((r(a) − r(b))/τ)."""
    rating_noise: float = 0.5
    """Standard deviation s ≥ 0 of the Gaussian noise added to 3 + 2·r before rounding to 1..5."""

    def __post_init__(self):
        check_range(self.temperature, "temperature", lo=0, lo_open=True)
        check_range(self.rating_noise, "rating_noise", lo=0)

    # ---------------------------------------------------------------- the hidden truth (evaluation only)
    def true_reward(self, text, prompt=""):
        """r(prompt + text): tanh of the total valence if well-formed, else −1 − share of unknown words."""
        if not isinstance(text, str) or not isinstance(prompt, str):
            raise TypeError(f"text and prompt must be strings, got {type(text).__name__} and {type(prompt).__name__}")
        x = prompt + text
        if parse(x) is not None:
            return math.tanh(sum(VALENCE.get(w, 0.0) for w in words(x)))
        ws = words(x)
        unknown = 1.0 if not ws else sum(w not in WORDS for w in ws) / len(ws)
        return -1.0 - unknown

    def true_rewards(self, texts, prompts=None):
        """``true_reward`` of each text (n,) float64; ``prompts`` is None or one string per text."""
        texts = _texts("texts", texts)
        prompts = [""] * len(texts) if prompts is None else _texts("prompts", prompts)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts has {len(prompts)} entries, texts has {len(texts)}")
        return np.array([self.true_reward(t, p) for t, p in zip(texts, prompts)], dtype=np.float64)

    def true_win(self, a, b, prompt=""):
        """1.0 if the true reward ranks a above b, 0.5 on a tie, 0.0 otherwise."""
        d = self.true_reward(a, prompt) - self.true_reward(b, prompt)
        return 0.5 if abs(d) <= 1e-12 else float(d > 0)

    def prob_prefer(self, a, b, prompt=""):
        """P(a preferred to b) = σ((r(a) − r(b))/τ)."""
        return sigmoid((self.true_reward(a, prompt) - self.true_reward(b, prompt)) / self.temperature)

    # ---------------------------------------------------------------- judgements (what training may use)
    def compare(self, a, b, rng, prompt=""):
        """One Bradley–Terry judgement: 1 if a is preferred, 0 if b is (one ``rng.random()``)."""
        _check_rng(rng)
        p = self.prob_prefer(a, b, prompt)
        return int(rng.random() < p)

    def compare_many(self, a, b, rng, prompts=None):
        """``compare`` for each pair (n,) int64 in {0, 1}; the same draws as n calls of ``compare``."""
        _check_rng(rng)
        a, b = _texts("a", a), _texts("b", b)
        if len(a) != len(b):
            raise ValueError(f"a has {len(a)} texts, b has {len(b)}")
        prompts = [""] * len(a) if prompts is None else _texts("prompts", prompts)
        if len(prompts) != len(a):
            raise ValueError(f"prompts has {len(prompts)} entries, a has {len(a)}")
        p = np.array([self.prob_prefer(x, y, q) for x, y, q in zip(a, b, prompts)], dtype=np.float64)
        return (rng.random(len(p)) < p).astype(np.int64)

    def label_pairs(self, prompts, a, b, rng, meta=None):
        """Judge pairs and return them as ``Preference`` records (chosen = the preferred response).

        ``meta`` (a dict) is copied into every record's metadata, beside ``"judge": "simulated"``.
        """
        prompts = _texts("prompts", prompts)
        won = self.compare_many(a, b, rng, prompts)
        extra = {} if meta is None else dict(meta)
        out = []
        for q, x, y, w in zip(prompts, a, b, won):
            chosen, rejected = (x, y) if w else (y, x)
            out.append(Preference(q, chosen, rejected, None, {"judge": "simulated", **extra}))
        return out

    def rate(self, text, rng, prompt=""):
        """A noisy rating in 1..5 of prompt + text (one ``rng.standard_normal()``)."""
        _check_rng(rng)
        y = 3.0 + 2.0 * self.true_reward(text, prompt) + self.rating_noise * rng.standard_normal()
        return int(min(5, max(1, math.floor(y + 0.5))))

    def rate_many(self, texts, rng, prompts=None):
        """``rate`` for each text as ``Rating`` records (the same draws as n calls of ``rate``)."""
        texts = _texts("texts", texts)
        prompts = [""] * len(texts) if prompts is None else _texts("prompts", prompts)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts has {len(prompts)} entries, texts has {len(texts)}")
        return [Rating(q, t, self.rate(t, rng, q), {"judge": "simulated"}) for q, t in zip(prompts, texts)]

    def label_accuracy_ceiling(self, a, b, prompts=None):
        """The best expected agreement any model can reach with this annotator's labels on the
        pairs (a_i, b_i): mean of max(p_i, 1 − p_i), p_i = P(a_i preferred)."""
        a, b = _texts("a", a), _texts("b", b)
        if len(a) != len(b) or not a:
            raise ValueError(f"a and b must be non-empty and of equal length, got {len(a)} and {len(b)}")
        prompts = [""] * len(a) if prompts is None else _texts("prompts", prompts)
        p = np.array([self.prob_prefer(x, y, q) for x, y, q in zip(a, b, prompts)])
        return float(np.mean(np.maximum(p, 1.0 - p)))
