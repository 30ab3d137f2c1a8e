"""The embedded corpus, its prompts and the simulated annotator."""

import math
import subprocess
import sys

import numpy as np
import pytest

from rlhf_ref.annotator import SimulatedAnnotator, sigmoid
from rlhf_ref.data import corpus
from rlhf_ref.data.corpus import (CHARS, CORPUS_LINES, CORPUS_SEED, MAX_CHARS, MIN_CHARS, VALENCE, default_split,
                                  default_vocab, generate_corpus, load_corpus, parse, prompt_pairs, sentiment_class,
                                  split_line, split_prompts)
from rlhf_ref.preferences import Preference, Rating

LINES = load_corpus()


# ----------------------------------------------------------------------------- corpus
def test_shipped_corpus_is_reproducible_from_its_seed():
    assert LINES == generate_corpus(CORPUS_LINES, CORPUS_SEED)
    assert len(LINES) == CORPUS_LINES


def test_generation_is_deterministic_and_seed_dependent():
    assert generate_corpus(50, 1) == generate_corpus(50, 1)
    assert generate_corpus(50, 1) != generate_corpus(50, 2)
    assert generate_corpus(0, 1) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_corpus(-1, 0)
    with pytest.raises(TypeError, match="seed"):
        generate_corpus(3, np.random.default_rng(0))


def test_every_line_is_short_well_formed_and_in_the_small_character_set():
    assert all(MIN_CHARS <= len(s) <= MAX_CHARS for s in LINES)
    assert all(parse(s) is not None for s in LINES)
    assert set("".join(LINES)) <= set(CHARS)
    assert 30 <= len(default_vocab()) <= 35


def test_vocabulary_round_trip_over_the_whole_corpus():
    v = default_vocab()
    for s in LINES:
        ids = v.encode(s, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert v.decode(ids) == s


def test_corpus_is_mostly_neutral_with_room_to_improve():
    ann = SimulatedAnnotator()
    r = ann.true_rewards(LINES)
    assert abs(r.mean()) < 0.1                       # neutral to mixed on average
    assert np.mean(r > 0.9) < 0.05                   # very positive lines are rare ...
    assert ann.true_reward("the happy cat looks cheerful today.") > 0.9      # ... but reachable
    classes = [sentiment_class(w) for s in LINES for w in corpus.words(s) if w in VALENCE]
    assert classes.count("neutral") > 0.5 * len(classes)


def test_parse_accepts_grammar_and_rejects_everything_else():
    assert parse("the cat looks happy today.") is not None
    assert parse("today, the cat is sad.") is not None
    assert parse("tom is sad, and mia is glad.") is not None
    for bad in ["the cat looks happy today", "the cat looks happy happy.", "the cat looks hapy.",
                "the  cat is sad.", " the cat is sad.", "the cat is sad. ", "the cat is sad..", "",
                "The cat is sad.", "cat the is sad."]:
        assert parse(bad) is None, bad
    with pytest.raises(TypeError, match="text must be str"):
        parse(3)


def test_prompts_split_a_line_into_prefix_and_continuation():
    assert split_line("the cat looks happy today.") == ("the cat ", "looks happy today.")
    assert split_line("today, the cow seems tired.", 1) == ("today, ", "the cow seems tired.")
    for p, c in prompt_pairs(LINES):
        assert c and p.endswith(" ") and len(p.split()) == 2
    with pytest.raises(ValueError, match="no continuation"):
        split_line("tom runs.", 2)
    with pytest.raises(ValueError, match="n_words"):
        split_line("tom runs fast.", 0)


def test_default_split_is_fixed_disjoint_and_large_enough():
    s1, s2 = default_split(), default_split()
    assert s1 == s2
    assert len(s1.heldout) >= 200 and len(s1.train) >= 200
    assert not set(s1.train) & set(s1.heldout)
    assert {p for p, _ in s1.heldout_pairs} == set(s1.heldout)
    assert len(s1.train_pairs) + len(s1.heldout_pairs) == len(LINES)
    assert all(p + c in set(LINES) for p, c in s1.heldout_pairs[:50])


def test_split_prompts_validates():
    with pytest.raises(TypeError, match="rng"):
        split_prompts(LINES, 0)
    with pytest.raises(ValueError, match="n_heldout"):
        split_prompts(LINES[:10], np.random.default_rng(0), n_heldout=10)


def test_importing_the_data_side_pulls_no_optional_dependency():
    code = ("import sys, rlhf_ref.data, rlhf_ref.annotator, rlhf_ref.preferences, rlhf_ref.io, rlhf_ref.label\n"
            "print([m for m in ('numba', 'scipy', 'torch', 'gymnasium', 'matplotlib', 'tqdm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- annotator
ANN = SimulatedAnnotator()


def test_true_reward_is_sentiment_on_well_formed_text():
    assert ANN.true_reward("the cat is happy.") == pytest.approx(math.tanh(1.0))
    assert ANN.true_reward("the cat is sad.") == pytest.approx(math.tanh(-1.0))
    assert ANN.true_reward("tom meets anna.") == 0.0
    assert ANN.true_reward("is happy.", prompt="the cat ") == ANN.true_reward("the cat is happy.")
    pos = ANN.true_reward("the kind cat looks happy today.")
    assert pos == pytest.approx(math.tanh(1.7)) and pos > ANN.true_reward("the cat looks happy today.")


def test_ill_formed_text_ranks_below_every_well_formed_text():
    worst_ok = ANN.true_reward("the sad cat is angry.")
    for bad in ["the cat is happy", "the cat is happy happy happy.", "happy happy happy.", "xq zz.", "",
                "the cat is happy. the cat is happy."]:
        r = ANN.true_reward(bad)
        assert -2.0 <= r <= -1.0 and r < worst_ok, bad
    assert ANN.true_reward("xq zz.") == -2.0
    assert ANN.true_reward("the cat is hapy.") == pytest.approx(-1.25)


def test_true_win_and_its_symmetry():
    a, b = "the cat is happy.", "the cat is sad."
    assert ANN.true_win(a, b) == 1.0 and ANN.true_win(b, a) == 0.0 and ANN.true_win(a, a) == 0.5
    assert ANN.true_win("is happy.", "is sad.", prompt="the cat ") == 1.0


def test_bradley_terry_frequencies_match_sigmoid():
    rng = np.random.default_rng(123)
    n = 4000
    pairs = [("the cat is calm.", "the cat is curious."),       # Δ = tanh(.2) − tanh(.15): near a coin flip
             ("the cat is calm.", "the cat is busy."),
             ("the cat is glad.", "the cat is calm."),
             ("the cat is sad.", "the cat is glad.")]
    for a, b in pairs:
        p = sigmoid((ANN.true_reward(a) - ANN.true_reward(b)) / ANN.temperature)
        assert p == pytest.approx(ANN.prob_prefer(a, b))
        wins = ANN.compare_many([a] * n, [b] * n, rng)
        bound = 4 * math.sqrt(p * (1 - p) / n) + 1e-9
        assert abs(wins.mean() - p) <= bound, (a, b, wins.mean(), p)


def test_compare_uses_one_uniform_and_matches_compare_many():
    a = ["the cat is calm.", "the cat is glad.", "tom runs slowly."]
    b = ["the cat is busy.", "the cat is sad.", "tom runs loudly."]
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    one = [ANN.compare(x, y, r1) for x, y in zip(a, b)]
    many = ANN.compare_many(a, b, r2)
    assert one == many.tolist()
    assert r1.random() == r2.random()                      # same number of draws consumed
    assert set(many.tolist()) <= {0, 1}


def test_label_pairs_makes_preferences_deterministically():
    prompts = ["the cat "] * 3
    a = ["is glad.", "is sad.", "is calm."]
    b = ["is sad.", "is glad.", "is busy."]
    recs1 = ANN.label_pairs(prompts, a, b, np.random.default_rng(9), meta={"round": 1})
    recs2 = ANN.label_pairs(prompts, a, b, np.random.default_rng(9), meta={"round": 1})
    assert recs1 == recs2
    assert all(isinstance(r, Preference) and r.meta == {"judge": "simulated", "round": 1} for r in recs1)
    assert {r.chosen for r in recs1[:2]} == {"is glad."}      # Δ ≈ 1.5/τ: the noise never flips these


def test_ratings_are_integers_in_range_and_track_the_true_reward():
    rng = np.random.default_rng(0)
    texts = ["the cat is happy.", "the cat is calm.", "the cat is sad.", "garbage words"]
    means = []
    for t in texts:
        rs = [ANN.rate(t, rng) for _ in range(400)]
        assert all(isinstance(r, int) and 1 <= r <= 5 for r in rs)
        means.append(np.mean(rs))
    assert means[0] > means[1] > means[2] >= means[3]
    assert means[3] == 1.0
    recs = ANN.rate_many(texts, np.random.default_rng(1))
    assert all(isinstance(r, Rating) for r in recs)
    g = np.random.default_rng(1)
    assert [r.rating for r in recs] == [ANN.rate(t, g) for t in texts]      # the same draws, in order


def test_annotator_is_deterministic_with_a_seed():
    a, b = LINES[:200], LINES[200:400]
    assert np.array_equal(ANN.compare_many(a, b, np.random.default_rng(3)),
                          ANN.compare_many(a, b, np.random.default_rng(3)))
    assert [ANN.rate(t, np.random.default_rng(4)) for t in a] == [ANN.rate(t, np.random.default_rng(4)) for t in a]


def test_label_ceiling_is_high_on_same_prompt_corpus_pairs():
    by = {}
    for p, c in prompt_pairs(LINES):
        by.setdefault(p, []).append(c)
    a, b, q = [], [], []
    for p, cs in sorted(by.items()):
        for x, y in zip(cs[::2], cs[1::2]):
            a.append(x), b.append(y), q.append(p)
    assert ANN.label_accuracy_ceiling(a, b, q) > 0.9


def test_annotator_validates_its_arguments():
    with pytest.raises(ValueError, match="temperature"):
        SimulatedAnnotator(temperature=0)
    with pytest.raises(ValueError, match="rating_noise"):
        SimulatedAnnotator(rating_noise=-1)
    with pytest.raises(TypeError, match="rng"):
        ANN.compare("a.", "b.", 0)
    with pytest.raises(TypeError, match="rng"):
        ANN.rate("a.", None)
    with pytest.raises(ValueError, match="b has"):
        ANN.compare_many(["a."], [], np.random.default_rng(0))
    with pytest.raises(TypeError, match="texts must be a sequence"):
        ANN.true_rewards("the cat is sad.")
    with pytest.raises(TypeError, match="text and prompt must be strings"):
        ANN.true_reward(None)
