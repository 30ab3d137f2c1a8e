"""Preference and rating files (JSON Lines), and their encoding for the reward model.

Preferences — the format TRL and most RLHF tools read: one JSON object per line::

    {"prompt": "the cat ", "chosen": "looks happy.", "rejected": "looks sad.", "margin": 1.0, "pair_id": "c17"}

``prompt``, ``chosen``, ``rejected`` are strings (the texts judged are ``prompt + chosen`` and
``prompt + rejected``); ``margin`` is an optional finite number (the reward model's Bradley–Terry
margin, TRL's convention: ``Δ = r(chosen) − r(rejected) − margin``); every other key is metadata,
kept in ``Preference.meta`` and written back at the top level. A **tie** is a line with
``"tie": true`` whose ``chosen``/``rejected`` are simply the left and right texts; ties carry no
Bradley–Terry information, so ``load_preferences`` drops them unless ``ties="keep"`` (tools that do
not know the key should filter ``tie == true`` first).

Ratings: one JSON object per line with ``prompt`` (str), ``response`` (str) and ``rating`` (an
integer 1..5; 4.0 or true is refused), other keys are metadata as above.

Reading is strict. A line that is not valid UTF-8 or JSON (NaN/Infinity and duplicate keys
included), not an object, lacks a field or has a field of the wrong type raises
``PreferenceFileError`` (a ``ValueError``) naming the file, the 1-based line number and what was
wrong — no line is ever skipped silently. Blank (whitespace-only) lines hold no record and are
ignored; an empty file is an empty list (a labelling session that has not started); a last line
without a newline is read like any other.

Writing: ``save_preferences``/``save_ratings`` replace the file atomically (``rlhf_ref.io``);
``append_preference``/``append_rating`` write one line to an open file, flush and fsync, so a
record is on disk when the call returns. Output is UTF-8 with ``ensure_ascii=False``.

Encoding for the reward model (``encode_pairs``), P pairs, T = longest sequence (or ``pad_to``)::

    chosen, rejected             (P, T) int64   BOS + prompt + response + EOS, right-padded with PAD
    chosen_mask, rejected_mask   (P, T) float64 1 on real tokens
    prompt_len                   (P,) int64     1 + len(prompt): BOS and the prompt
    margin                       (P,) float64 or None (None when no record has a margin; else 0 where missing)
"""

from __future__ import annotations

import io as _stdio  # the standard library (rlhf_ref.io is imported below as .io)
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .io import atomic_write_text
from .safe_read import FileReadError
from .tokenizer import Vocab, pad_batch

__all__ = ["Preference", "Rating", "PreferenceFileError", "load_preferences", "save_preferences",
           "append_preference", "load_ratings", "save_ratings", "append_rating", "encode_pairs",
           "preference_from_dict", "rating_from_dict"]

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "margin")
RATING_FIELDS = ("prompt", "response", "rating")


class PreferenceFileError(FileReadError):
    """A malformed preference or rating file; the message is ``<file>:<line>: <what was wrong>``
    (``<file>: <what>`` when ``lineno`` is None: the file itself is refused)."""

    def __init__(self, path, lineno, reason):
        self.lineno, self.reason = lineno, reason
        super().__init__(path, reason, line=lineno)


def _check_meta(meta, reserved, where):
    if not isinstance(meta, dict):
        raise TypeError(f"{where}.meta must be a dict, got {type(meta).__name__}")
    for k in meta:
        if not isinstance(k, str):
            raise TypeError(f"{where}.meta keys must be strings, got {k!r}")
        if k in reserved:
            raise ValueError(f"{where}.meta may not use the reserved key {k!r} (reserved: {list(reserved)})")
    if "tie" in meta and not isinstance(meta["tie"], bool):
        raise TypeError(f"{where}.meta['tie'] must be true or false, got {meta['tie']!r}")


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _finite_number(x):
    """True for an int or float that is a finite float64 (a 401-digit integer is not)."""
    if not _is_number(x):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


@dataclass
class Preference:
    """One judgement: ``prompt + chosen`` is preferred to ``prompt + rejected``."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"Preference.{name} must be a string, got {type(v).__name__} {v!r:.60}")
        if self.margin is not None:
            if not _finite_number(self.margin):
                raise ValueError(f"Preference.margin must be a finite number or None, got {self.margin!r}")
            self.margin = float(self.margin)
        _check_meta(self.meta, PREFERENCE_FIELDS, "Preference")

    @property
    def tie(self):
        return bool(self.meta.get("tie", False))

    def to_dict(self):
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            d["margin"] = self.margin
        d.update(self.meta)
        return d


@dataclass
class Rating:
    """One rating of ``prompt + response`` on a 1..5 scale."""

    prompt: str
    response: str
    rating: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("prompt", "response"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"Rating.{name} must be a string, got {type(v).__name__} {v!r:.60}")
        r = self.rating
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or not 1 <= r <= 5:
            raise ValueError(f"Rating.rating must be an integer from 1 to 5, got {r!r}")
        self.rating = int(r)
        _check_meta(self.meta, RATING_FIELDS, "Rating")

    def to_dict(self):
        return {"prompt": self.prompt, "response": self.response, "rating": self.rating, **self.meta}


def preference_from_dict(d):
    """A ``Preference`` from one parsed JSON object; ValueError saying what is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(d)}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in d]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"(a preference needs 'prompt', 'chosen', 'rejected')")
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(d[k], str):
            raise ValueError(f"field {k!r} must be a string, got {_json_type(d[k])} {d[k]!r:.60}")
    margin = d.get("margin")
    if margin is not None and not _finite_number(margin):
        raise ValueError(f"field 'margin' must be a finite number or null, got {_json_type(margin)} {margin!r:.60}")
    if "tie" in d and not isinstance(d["tie"], bool):
        raise ValueError(f"field 'tie' must be true or false, got {_json_type(d['tie'])} {d['tie']!r:.60}")
    meta = {k: v for k, v in d.items() if k not in PREFERENCE_FIELDS}
    return Preference(d["prompt"], d["chosen"], d["rejected"], margin, meta)


def rating_from_dict(d):
    """A ``Rating`` from one parsed JSON object; ValueError saying what is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(d)}")
    missing = [k for k in RATING_FIELDS if k not in d]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"(a rating needs 'prompt', 'response', 'rating')")
    for k in ("prompt", "response"):
        if not isinstance(d[k], str):
            raise ValueError(f"field {k!r} must be a string, got {_json_type(d[k])} {d[k]!r:.60}")
    r = d["rating"]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 5:
        raise ValueError(f"field 'rating' must be an integer from 1 to 5, got {_json_type(r)} {r!r:.60}")
    return Rating(d["prompt"], d["response"], r, {k: v for k, v in d.items() if k not in RATING_FIELDS})


def _json_type(v):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _read_jsonl(path, convert):
    """Parse every non-blank line of ``path`` with ``convert``; errors name file and line.

    The file is read through ``rlhf_ref.safe_read`` (a regular file within the size limit: a
    symlink, a FIFO, a device or a folder is refused, as is a line nested too deeply or holding
    a lone surrogate)."""
    from .safe_read import FileReadError, loads_json, no_duplicate_keys, read_bytes
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    name = os.fspath(path)
    try:
        data = read_bytes(name, what="file")
    except FileReadError as e:
        raise PreferenceFileError(name, None, e.what) from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()                      # the newline that ends the last line
    out = []
    for i, raw in enumerate(lines, start=1):
        cut = " (the last line has no newline: the file may have been cut off mid-write)" \
            if i == len(lines) and not data.endswith(b"\n") else ""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PreferenceFileError(name, i, f"not valid UTF-8 ({e.reason} at byte {e.start}){cut}") from None
        if not text.strip():
            continue
        try:
            obj = loads_json(text, name, i, what="line", object_pairs_hook=no_duplicate_keys)
        except FileReadError as e:
            what = e.what[len("line is "):] if e.what.startswith("line is ") else e.what
            raise PreferenceFileError(name, i, f"{what}{cut}") from None
        try:
            out.append(convert(obj))
        except (ValueError, TypeError, OverflowError) as e:
            raise PreferenceFileError(name, i, str(e)) from None
    return out


def _dumps(d):
    return json.dumps(d, ensure_ascii=False, allow_nan=False)


def _as_records(records, cls, from_dict, what):
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise TypeError(f"records must be a list of {cls.__name__} (or dicts), got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        if isinstance(r, dict):
            try:
                r = from_dict(r)
            except ValueError as e:
                raise ValueError(f"records[{i}] is not a valid {what}: {e}") from None
        elif not isinstance(r, cls):
            raise TypeError(f"records[{i}] must be a {cls.__name__} or a dict, got {type(r).__name__}")
        out.append(r)
    return out


def _lines(records, where):
    parts = []
    for i, r in enumerate(records):
        try:
            parts.append(_dumps(r.to_dict()) + "\n")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{i}] cannot be written as JSON (meta must hold JSON values): {e}") from None
    return "".join(parts)


def _append(fh, line):
    """One line in as few write calls as the file allows (one, for a line under the buffer size)."""
    if getattr(fh, "closed", False):
        raise ValueError("the file handle is closed")
    if isinstance(fh, _stdio.TextIOBase):
        fh.write(line)
    else:
        data = memoryview(line.encode("utf-8"))
        while len(data):
            n = fh.write(data)
            data = data[len(data) if n is None else n:]
    fh.flush()
    os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- preferences
def load_preferences(path, *, ties="drop"):
    """Every preference in the JSON Lines file ``path``, in file order.

    ties: "drop" (default: Bradley–Terry training data), "keep" (returned with ``.tie`` True),
    or "error" (a tie line raises, naming its line).
    """
    if ties not in ("drop", "keep", "error"):
        raise ValueError(f"ties must be 'drop', 'keep' or 'error', got {ties!r}")

    def convert(obj):
        p = preference_from_dict(obj)
        if p.tie and ties == "error":
            raise ValueError("a tie (\"tie\": true) where ties='error' was asked for")
        return p

    recs = _read_jsonl(path, convert)
    return recs if ties != "drop" else [p for p in recs if not p.tie]


def save_preferences(path, records):
    """Replace ``path`` atomically with ``records`` (Preferences or dicts), one per line."""
    recs = _as_records(records, Preference, preference_from_dict, "preference")
    atomic_write_text(path, _lines(recs, "records"))


def append_preference(fh, record):
    """Append one record to the open file ``fh`` (text or binary, append mode), flush and fsync."""
    rec = _as_records([record], Preference, preference_from_dict, "preference")[0]
    _append(fh, _lines([rec], "record"))


# ----------------------------------------------------------------------------- ratings
def load_ratings(path):
    """Every rating in the JSON Lines file ``path``, in file order (strict, like load_preferences)."""
    return _read_jsonl(path, rating_from_dict)


def save_ratings(path, records):
    """Replace ``path`` atomically with ``records`` (Ratings or dicts), one per line."""
    recs = _as_records(records, Rating, rating_from_dict, "rating")
    atomic_write_text(path, _lines(recs, "records"))


def append_rating(fh, record):
    """Append one rating to the open file ``fh``, flush and fsync."""
    rec = _as_records([record], Rating, rating_from_dict, "rating")[0]
    _append(fh, _lines([rec], "record"))


# ----------------------------------------------------------------------------- encoding
def encode_pairs(records, vocab, pad_to=None, errors="strict"):
    """Token arrays for the reward model (shapes in the module docstring).

    Each side is ``BOS + prompt + response + EOS`` encoded with ``vocab``; both sides share one
    width T (the longest sequence, or ``pad_to``). Ties are refused (they have no chosen side).
    """
    if not isinstance(vocab, Vocab):
        raise TypeError(f"vocab must be a rlhf_ref.tokenizer.Vocab, got {type(vocab).__name__}")
    recs = _as_records(records, Preference, preference_from_dict, "preference")
    if not recs:
        raise ValueError("records is empty: encode_pairs needs at least one preference")
    chosen, rejected = [], []
    for i, r in enumerate(recs):
        if r.tie:
            raise ValueError(f"records[{i}] is a tie; drop ties before encoding (load_preferences does by default)")
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            try:
                out.append(vocab.encode(r.prompt + getattr(r, side), bos=True, eos=True, errors=errors))
            except ValueError as e:
                raise ValueError(f"records[{i}].prompt + .{side}: {e}") from None
    T = max(len(s) for s in chosen + rejected) if pad_to is None else int(pad_to)
    longest = max(len(s) for s in chosen + rejected)
    if longest > T:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded sequence ({longest} tokens)")
    c, cm = pad_batch(chosen, T)
    rj, rm = pad_batch(rejected, T)
    has_margin = any(r.margin is not None for r in recs)
    margin = np.array([r.margin or 0.0 for r in recs], dtype=np.float64) if has_margin else None
    return {
        "chosen": c, "chosen_mask": cm,                  # (P, T)
        "rejected": rj, "rejected_mask": rm,             # (P, T)
        "prompt_len": np.array([1 + len(r.prompt) for r in recs], dtype=np.int64),  # (P,)
        "margin": margin,                                # (P,) or None
    }
