"""Preference and rating files: round trips, strict errors naming file and line, encoding."""

import json
import os

import numpy as np
import pytest

from rlhf_ref.data.corpus import default_vocab
from rlhf_ref.preferences import (Preference, PreferenceFileError, Rating, append_preference, append_rating,
                                  encode_pairs, load_preferences, load_ratings, save_preferences, save_ratings)
from rlhf_ref.tokenizer import BOS, EOS, PAD

RECS = [
    Preference("the cat ", "is happy.", "is sad."),
    Preference("tom ", "runs happily.", "runs badly.", margin=0.5, meta={"pair_id": "p1", "nested": {"k": [1, 2]}}),
    Preference("é ", "ünïcode ✓", "x", margin=-1, meta={"tie": False}),
]


def write(tmp_path, text, name="prefs.jsonl"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def test_round_trip(tmp_path):
    p = tmp_path / "prefs.jsonl"
    save_preferences(p, RECS)
    assert load_preferences(p) == RECS
    first = json.loads(p.read_text(encoding="utf-8").splitlines()[1])
    assert first == {"prompt": "tom ", "chosen": "runs happily.", "rejected": "runs badly.", "margin": 0.5,
                     "pair_id": "p1", "nested": {"k": [1, 2]}}            # meta back at the top level
    save_preferences(p, [r.to_dict() for r in RECS])                       # dicts are accepted too
    assert load_preferences(p) == RECS


def test_append_is_on_disk_and_readable(tmp_path):
    p = tmp_path / "prefs.jsonl"
    with open(p, "a", encoding="utf-8") as fh:
        for r in RECS:
            append_preference(fh, r)
            assert load_preferences(p)[-1] == r                           # flushed after each call
    with open(p, "ab", buffering=0) as fh:                                # binary, unbuffered works too
        append_preference(fh, {"prompt": "a", "chosen": "b", "rejected": "c"})
    assert len(load_preferences(p)) == 4


def test_ties_dropped_by_default_kept_or_refused_on_request(tmp_path):
    p = write(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                        '{"prompt": "p", "chosen": "c", "rejected": "d", "tie": true}\n')
    assert [r.chosen for r in load_preferences(p)] == ["a"]
    kept = load_preferences(p, ties="keep")
    assert len(kept) == 2 and kept[1].tie
    with pytest.raises(PreferenceFileError, match=r"prefs\.jsonl:2: .*tie"):
        load_preferences(p, ties="error")
    with pytest.raises(ValueError, match="ties must be"):
        load_preferences(p, ties="maybe")


def test_blank_lines_and_empty_files(tmp_path):
    p = write(tmp_path, '\n{"prompt": "p", "chosen": "a", "rejected": "b"}\n   \n\n'
                        '{"prompt": "q", "chosen": "a", "rejected": "b"}')      # no final newline: fine
    assert [r.prompt for r in load_preferences(p)] == ["p", "q"]
    assert load_preferences(write(tmp_path, "", "empty.jsonl")) == []
    assert load_ratings(write(tmp_path, "\n\n", "blank.jsonl")) == []


GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
BAD_LINES = [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "p"}', "missing fields 'chosen', 'rejected'"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "field 'prompt' must be a string, got a number"),
    ('{"prompt": "p", "chosen": null, "rejected": "b"}', "field 'chosen' must be a string, got null"),
    ('{"prompt": "p", "chosen": "a", "rejected": ["b"]}', "field 'rejected' must be a string, got an array"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}', "'margin' must be a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}', "'margin' must be a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "NaN is not valid JSON"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}', "Infinity is not valid JSON"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}', "'margin' must be a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}', "'tie' must be true or false"),
    ('{"prompt": "p", "prompt": "q", "chosen": "a", "rejected": "b"}', "duplicate key 'prompt'"),
]


@pytest.mark.parametrize("line, why", BAD_LINES)
def test_each_malformed_line_names_file_line_and_cause(tmp_path, line, why):
    p = write(tmp_path, GOOD + "\n" + GOOD + line + "\n" + GOOD)        # the bad line is line 4
    with pytest.raises(PreferenceFileError) as e:
        load_preferences(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4: "), msg
    assert why in msg, msg
    assert e.value.lineno == 4 and e.value.path == str(p)
    assert isinstance(e.value, ValueError)


def test_invalid_utf8_and_cut_off_last_line(tmp_path):
    p = write(tmp_path, GOOD.encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceFileError, match=r":2: not valid UTF-8"):
        load_preferences(p)
    p = write(tmp_path, GOOD + GOOD + '{"prompt": "p", "cho')
    with pytest.raises(PreferenceFileError, match=r":3: not valid JSON.*cut off mid-write"):
        load_preferences(p)


def test_no_silent_skip_the_first_error_stops_the_load(tmp_path):
    p = write(tmp_path, GOOD + "garbage\n" + GOOD)
    with pytest.raises(PreferenceFileError, match=":2:"):
        load_preferences(p)


def test_ratings_round_trip_and_errors(tmp_path):
    recs = [Rating("the cat ", "is happy.", 5), Rating("tom ", "runs.", 1, {"item_id": "x/a"})]
    p = tmp_path / "ratings.jsonl"
    save_ratings(p, recs)
    assert load_ratings(p) == recs
    with open(p, "a", encoding="utf-8") as fh:
        append_rating(fh, Rating("a", "b", 3))
    assert load_ratings(p)[-1].rating == 3
    for line, why in [('{"prompt": "p", "response": "r", "rating": 6}', "from 1 to 5, got a number 6"),
                      ('{"prompt": "p", "response": "r", "rating": 4.0}', "integer from 1 to 5"),
                      ('{"prompt": "p", "response": "r", "rating": true}', "integer from 1 to 5"),
                      ('{"prompt": "p", "response": "r"}', "missing field 'rating'"),
                      ('{"prompt": "p", "response": 1, "rating": 2}', "'response' must be a string")]:
        q = write(tmp_path, '{"prompt": "p", "response": "r", "rating": 2}\n' + line + "\n", "r.jsonl")
        with pytest.raises(PreferenceFileError, match=rf"r\.jsonl:2: .*{why}"):
            load_ratings(q)


def test_records_validate_and_saving_is_atomic(tmp_path):
    with pytest.raises(TypeError, match="Preference.chosen must be a string"):
        Preference("p", 1, "r")
    with pytest.raises(ValueError, match="margin must be a finite number"):
        Preference("p", "c", "r", margin=float("nan"))
    with pytest.raises(ValueError, match="reserved key 'margin'"):
        Preference("p", "c", "r", meta={"margin": 1})
    with pytest.raises(ValueError, match="Rating.rating"):
        Rating("p", "r", 0)
    p = tmp_path / "prefs.jsonl"
    save_preferences(p, RECS[:1])
    before = p.read_bytes()
    with pytest.raises(ValueError, match=r"records\[1\] cannot be written as JSON"):
        save_preferences(p, [RECS[0], Preference("p", "c", "r", meta={"x": object()})])
    with pytest.raises(ValueError, match=r"records\[0\] is not a valid preference: missing field"):
        save_preferences(p, [{"prompt": "p"}])
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["prefs.jsonl"]                       # no temporary file left


def test_encode_pairs_shapes_tokens_and_masks():
    v = default_vocab()
    recs = [Preference("the cat ", "is glad.", "looks very sad."), Preference("tom ", "runs.", "sings.", margin=2)]
    enc = encode_pairs(recs, v)
    P, T = enc["chosen"].shape
    assert (P, T) == (2, 1 + len("the cat looks very sad.") + 1)
    assert enc["rejected"].shape == enc["chosen_mask"].shape == enc["rejected_mask"].shape == (P, T)
    assert enc["chosen"].dtype == np.int64
    row = enc["chosen"][0]
    n = int(enc["chosen_mask"][0].sum())
    assert row[0] == BOS and row[n - 1] == EOS and np.all(row[n:] == PAD)
    assert v.decode(row) == "the cat is glad."
    assert v.decode(enc["rejected"][1]) == "tom sings."
    assert enc["prompt_len"].tolist() == [1 + 8, 1 + 4]
    assert enc["margin"].tolist() == [0.0, 2.0]
    assert encode_pairs(recs[:1], v)["margin"] is None
    assert encode_pairs(recs, v, pad_to=40)["chosen"].shape == (2, 40)
    with pytest.raises(ValueError, match="pad_to=5 is shorter"):
        encode_pairs(recs, v, pad_to=5)
    with pytest.raises(ValueError, match=r"records\[0\]\.prompt \+ \.chosen: character 'X'"):
        encode_pairs([Preference("X", "a", "b")], v)
    assert encode_pairs([Preference("X", "a", "b")], v, errors="replace")["chosen"][0, 1] == 3
    with pytest.raises(ValueError, match="is a tie"):
        encode_pairs([Preference("p", "a", "b", meta={"tie": True})], v)
    with pytest.raises(ValueError, match="records is empty"):
        encode_pairs([], v)
    with pytest.raises(TypeError, match="vocab must be"):
        encode_pairs(recs, "abc")


def test_encoded_pairs_feed_the_reward_model():
    from rlhf_ref import lstm, reward_model
    v = default_vocab()
    enc = encode_pairs([Preference("the cat ", "is glad.", "is sad.")] * 3, v)
    params = lstm.init_params(len(v), 8, 8, np.random.default_rng(0), heads=("reward",))
    out, grads = reward_model.bt_loss_and_grad(params, enc["chosen"], enc["chosen_mask"], enc["rejected"],
                                               enc["rejected_mask"], margin=enc["margin"])
    assert np.isfinite(out["loss"])
