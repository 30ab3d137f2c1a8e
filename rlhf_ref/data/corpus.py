"""The embedded default corpus: a small seeded grammar of short sentences, and its prompts.

The demo's text world. Lines like ``the cat looks happy today.`` come from a hand-written
grammar whose adjectives and adverbs carry a *valence* (a sentiment weight in [−1, 1]); the
simulated annotator (``rlhf_ref.annotator``) prefers texts with a higher total valence, so the
pretrained language model, which imitates a mostly neutral-to-mixed corpus, leaves room for RL
fine-tuning to improve. The grammar also decides what is *well-formed*: ``parse(text)`` is
``None`` for anything the grammar cannot generate, and the annotator penalises such text, so
degenerate outputs are never rewarded.

Grammar (terminals in quotes; each line is one sentence)::

    S  → NP LINK ADJ "."                      the cat looks happy.
       | NP LINK ADJ TIME "."                 the cat looks happy today.
       | NP LINK ADJ "and" ADJ "."            tom is calm and kind.
       | NP IVERB ADV "."                     my dog runs slowly.
       | NP IVERB ADV TIME "."                my dog runs slowly again.
       | NP TVERB NP "."                      anna meets the old king.
       | NP TVERB NP ADV "."                  the fox sees tom happily.
       | TIME "," NP LINK ADJ "."             today, the cow seems tired.
       | NP LINK ADJ "," "and" NP LINK ADJ "."    tom is sad, and mia is glad.
    NP → DET NOUN | DET ADJ NOUN | NAME

Every ADJ/ADV slot first draws a sentiment class — neutral with probability 0.6, positive 0.2,
negative 0.2 (``CLASS_PROBS``) — then a word of that class uniformly; an NP is a NAME with
probability 0.25, otherwise DET [ADJ] NOUN with an adjective with probability 0.25. Lines outside ``MIN_CHARS``–``MAX_CHARS`` (20–45) characters
are redrawn. All draws use ``rng.random()`` only (the most stable NumPy stream) with an
explicit inverse CDF, so ``generate_corpus(CORPUS_LINES, CORPUS_SEED)`` reproduces the shipped
``corpus.txt`` byte for byte (a test checks it).

Characters: lowercase a–z, space, comma and period; ``default_vocab()`` is the fixed
vocabulary ``Vocab(" ,.abc…z")``: V = 4 specials + 29 = 33.

Prompts (for RL and evaluation) are the first ``n_words`` (default 2) words of a line *with the
space after them*, so ``prompt + continuation == line`` and the policy's first action is the first
letter of the next word::

    "the cat looks happy today."  →  ("the cat ", "looks happy today.")

``split_prompts`` splits the distinct prompts of a corpus into a training set and a held-out
set (default 200 held-out prompts) with a seeded permutation; ``default_split()`` is the fixed
split of the shipped corpus that the demo uses (``SPLIT_SEED``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..tokenizer import Vocab

# ----------------------------------------------------------------------------- lexicon
# Valences: positive words 0.5..1, neutral words small and non-zero (so that two neutral
# sentences rarely tie), negative words −1..−0.5. Each word has exactly one category.

ADJ_VALENCE = {
    # positive
    "happy": 1.0, "glad": 0.8, "cheerful": 0.9, "lovely": 0.9, "kind": 0.7, "bright": 0.6,
    "brave": 0.6, "warm": 0.5,
    # neutral
    "calm": 0.2, "curious": 0.15, "young": 0.1, "quiet": 0.05, "tall": 0.02, "small": -0.02,
    "old": -0.05, "busy": -0.1, "sleepy": -0.15, "hungry": -0.2,
    # negative
    "sad": -1.0, "angry": -0.9, "grumpy": -0.8, "gloomy": -0.8, "lonely": -0.7, "rude": -0.7,
    "scared": -0.6, "tired": -0.5,
}
ADV_VALENCE = {
    "happily": 1.0, "gladly": 0.8, "kindly": 0.7, "sweetly": 0.6,
    "softly": 0.15, "quietly": 0.1, "quickly": 0.05, "slowly": -0.05, "loudly": -0.1,
    "sadly": -1.0, "angrily": -0.9, "badly": -0.7, "poorly": -0.5,
}
VALENCE = {**ADJ_VALENCE, **ADV_VALENCE}
"""Sentiment weight of every adjective and adverb (all other words weigh 0)."""

#: word-class boundaries: a word is positive when its valence >= POSITIVE_AT, negative when <= NEGATIVE_AT
POSITIVE_AT, NEGATIVE_AT = 0.5, -0.5

LEXICON = {
    "DET": ("the", "my", "our", "this", "that", "your"),
    "NOUN": ("cat", "dog", "bird", "fox", "cow", "horse", "duck", "frog", "pig", "sheep", "child",
             "baby", "girl", "boy", "baker", "farmer", "teacher", "doctor", "king", "queen"),
    "NAME": ("tom", "anna", "ben", "lucy", "sam", "mia", "jack", "emma", "max", "lily", "leo", "zoe"),
    "ADJ": tuple(ADJ_VALENCE),
    "ADV": tuple(ADV_VALENCE),
    "LINK": ("is", "looks", "seems", "feels"),
    "IVERB": ("runs", "sings", "walks", "plays", "sleeps", "talks", "works", "dances"),
    "TVERB": ("sees", "meets", "helps", "follows", "calls", "watches"),
    "TIME": ("today", "again", "now", "tonight", "outside"),
}
"""Word categories of the grammar (disjoint)."""

CATEGORY = {w: cat for cat, words in LEXICON.items() for w in words}
assert len(CATEGORY) == sum(len(ws) for ws in LEXICON.values()), "lexicon categories must be disjoint"
LITERALS = ("and",)
WORDS = frozenset(CATEGORY) | frozenset(LITERALS)
"""Every word the grammar knows."""

CHARS = " ,." + "abcdefghijklmnopqrstuvwxyz"
CORPUS_SEED = 20240605
CORPUS_LINES = 3000
SPLIT_SEED = 7
N_HELDOUT = 200
MIN_CHARS, MAX_CHARS = 20, 45
CLASS_PROBS = {"neutral": 0.6, "positive": 0.2, "negative": 0.2}
NAME_PROB = 0.25
NP_ADJ_PROB = 0.25

# Sentence templates: (weight, slots). "NP" expands to the three noun-phrase forms.
TEMPLATES = (
    (3.0, ("NP", "LINK", "ADJ", ".")),
    (3.0, ("NP", "LINK", "ADJ", "TIME", ".")),
    (1.5, ("NP", "LINK", "ADJ", "and", "ADJ", ".")),
    (2.0, ("NP", "IVERB", "ADV", ".")),
    (2.0, ("NP", "IVERB", "ADV", "TIME", ".")),
    (1.0, ("NP", "TVERB", "NP", ".")),
    (1.0, ("NP", "TVERB", "NP", "ADV", ".")),
    (1.0, ("TIME", ",", "NP", "LINK", "ADJ", ".")),
    (1.5, ("NP", "LINK", "ADJ", ",", "and", "NP", "LINK", "ADJ", ".")),
)
_NP_FORMS = (("DET", "NOUN"), ("DET", "ADJ", "NOUN"), ("NAME",))


def sentiment_class(word):
    """'positive', 'negative' or 'neutral' (words without valence are neutral)."""
    v = VALENCE.get(word, 0.0)
    return "positive" if v >= POSITIVE_AT else "negative" if v <= NEGATIVE_AT else "neutral"


_BY_CLASS = {cat: {c: tuple(w for w in LEXICON[cat] if sentiment_class(w) == c) for c in CLASS_PROBS}
             for cat in ("ADJ", "ADV")}


# ----------------------------------------------------------------------------- rendering and parsing
_TOKEN_RE = re.compile(r"[a-z]+|[,.]")


def render(tokens):
    """Join word and punctuation tokens: words separated by one space, ',' and '.' attached."""
    out = ""
    for tok in tokens:
        out += tok if tok in ",." or not out else " " + tok
    return out


def _expand(slots):
    """All flat category sequences of a template (each NP replaced by each NP form)."""
    seqs = [()]
    for s in slots:
        forms = _NP_FORMS if s == "NP" else ((s,),)
        seqs = [q + f for q in seqs for f in forms]
    return seqs


_FLAT = {}
for _w, _slots in TEMPLATES:
    for _seq in _expand(_slots):
        _FLAT.setdefault(len(_seq), []).append(_seq)


def _matches(tok, slot):
    if slot in LEXICON:
        return CATEGORY.get(tok) == slot
    return tok == slot


def parse(text):
    """The grammar's analysis of ``text``, or None when the grammar cannot generate it exactly.

    Returns a list of (token, category) with category a LEXICON key, or the token itself for
    literals ('and', ',', '.'). Exact means: the tokens match a template and the text is their
    canonical rendering (single spaces, no leading/trailing space, final period).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    tokens = _TOKEN_RE.findall(text)
    if not tokens or render(tokens) != text:
        return None
    for seq in _FLAT.get(len(tokens), ()):
        if all(_matches(t, s) for t, s in zip(tokens, seq)):
            return [(t, s if s in LEXICON else t) for t, s in zip(tokens, seq)]
    return None


def words(text):
    """The alphabetic words of ``text`` (punctuation and anything else dropped)."""
    return re.findall(r"[a-z]+", text)


# ----------------------------------------------------------------------------- generation
def _pick(rng, items, weights=None):
    """One item by inverse CDF on a single ``rng.random()`` draw."""
    u = rng.random()
    if weights is None:
        return items[min(int(u * len(items)), len(items) - 1)]
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    k = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return items[min(k, len(items) - 1)]


def _sentiment_word(rng, cat):
    cls = _pick(rng, tuple(CLASS_PROBS), tuple(CLASS_PROBS.values()))
    return _pick(rng, _BY_CLASS[cat][cls])


def _fill(rng, slot):
    if slot == "NP":
        if rng.random() < NAME_PROB:
            return [_pick(rng, LEXICON["NAME"])]
        det = _pick(rng, LEXICON["DET"])
        if rng.random() < NP_ADJ_PROB:
            return [det, _sentiment_word(rng, "ADJ"), _pick(rng, LEXICON["NOUN"])]
        return [det, _pick(rng, LEXICON["NOUN"])]
    if slot in ("ADJ", "ADV"):
        return [_sentiment_word(rng, slot)]
    if slot in LEXICON:
        return [_pick(rng, LEXICON[slot])]
    return [slot]


def generate_line(rng):
    """One sentence from the grammar (any length)."""
    slots = _pick(rng, tuple(t for _, t in TEMPLATES), tuple(w for w, _ in TEMPLATES))
    tokens = []
    for s in slots:
        tokens += _fill(rng, s)
    return render(tokens)


def generate_corpus(n=CORPUS_LINES, seed=CORPUS_SEED):
    """``n`` lines of MIN_CHARS..MAX_CHARS characters from the grammar, seeded.

    ``generate_corpus(CORPUS_LINES, CORPUS_SEED)`` equals ``load_corpus()``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, np.random.Generator):
        raise TypeError("seed must be an integer seed (generate_corpus makes its own Generator)")
    rng = np.random.default_rng(seed)
    lines = []
    while len(lines) < n:
        line = generate_line(rng)
        if MIN_CHARS <= len(line) <= MAX_CHARS:
            lines.append(line)
    return lines


def load_corpus():
    """The shipped corpus (``rlhf_ref/data/corpus.txt``): a list of CORPUS_LINES lines."""
    text = resources.files("rlhf_ref.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    return text.splitlines()


def default_vocab():
    """The fixed character vocabulary of the corpus: ``Vocab(CHARS)`` (V = 33)."""
    return Vocab(CHARS)


# ----------------------------------------------------------------------------- prompts
def split_line(line, n_words=2):
    """``(prompt, continuation)`` with prompt = the first ``n_words`` words and the space after.

    ``prompt + continuation == line``; the continuation is never empty (a ValueError when the
    line has too few words).
    """
    if not isinstance(line, str):
        raise TypeError(f"line must be str, got {type(line).__name__}")
    if isinstance(n_words, bool) or not isinstance(n_words, (int, np.integer)) or n_words < 1:
        raise ValueError(f"n_words must be a positive integer, got {n_words!r}")
    parts = line.split(" ")
    if len(parts) <= n_words:
        raise ValueError(f"line {line!r} has {len(parts)} words; a prompt of n_words={n_words} "
                         f"would leave no continuation")
    prompt = " ".join(parts[:n_words]) + " "
    return prompt, line[len(prompt):]


def prompt_pairs(lines, n_words=2):
    """``[(prompt, continuation), ...]`` for every line, in order (see ``split_line``)."""
    return [split_line(line, n_words) for line in lines]


@dataclass(frozen=True)
class PromptSplit:
    """A train / held-out split of prompts. ``*_pairs`` hold (prompt, corpus continuation)."""

    train: tuple            # distinct training prompts, sorted
    heldout: tuple          # distinct held-out prompts, sorted
    train_pairs: tuple      # (prompt, continuation) for every corpus line whose prompt is in train
    heldout_pairs: tuple


def split_prompts(lines, rng, n_heldout=N_HELDOUT, n_words=2):
    """Split the distinct prompts of ``lines`` into train and held-out sets.

    The sorted distinct prompts are permuted with ``rng`` (an ``np.random.Generator``); the
    first ``n_heldout`` become the held-out set. Every line goes to the side its prompt is on.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    pairs = prompt_pairs(lines, n_words)
    distinct = sorted({p for p, _ in pairs})
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, (int, np.integer)) \
            or not 0 <= n_heldout < len(distinct):
        raise ValueError(f"n_heldout must be an integer in [0, {len(distinct)}) (the number of distinct "
                         f"prompts), got {n_heldout!r}")
    order = rng.permutation(len(distinct))
    held = frozenset(distinct[i] for i in order[:n_heldout])
    return PromptSplit(
        train=tuple(p for p in distinct if p not in held),
        heldout=tuple(p for p in distinct if p in held),
        train_pairs=tuple(pc for pc in pairs if pc[0] not in held),
        heldout_pairs=tuple(pc for pc in pairs if pc[0] in held),
    )


def default_split():
    """The demo's fixed split of the shipped corpus: ``split_prompts(load_corpus(), default_rng(SPLIT_SEED))``."""
    return split_prompts(load_corpus(), np.random.default_rng(SPLIT_SEED), N_HELDOUT, 2)
