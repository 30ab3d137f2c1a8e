"""Character-level tokenizer: the reference vocabulary.

Ids 0..3 are special and fixed: PAD = 0, BOS = 1, EOS = 2, UNK = 3; characters
follow in the order given. A text becomes ``[BOS] + chars (+ [EOS])``.

Unknown characters raise ``ValueError`` naming the character and its position
(``errors="strict"``, the default) or map to UNK (``errors="replace"``; UNK
decodes to U+FFFD). Decoding stops at EOS and skips PAD and BOS.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Vocab:
    """A character vocabulary.

    >>> v = Vocab("ab ")
    >>> v.encode("ab a", eos=True).tolist()
    [1, 4, 5, 6, 4, 2]
    >>> v.decode(v.encode("ab a"))
    'ab a'
    """

    def __init__(self, chars):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"chars must be distinct, got duplicates {dup!r}")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars must be single characters, got {c!r}")
        self.chars = chars
        self._index = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts):
        """The vocabulary of every character in ``texts``, sorted by code point."""
        return cls(sorted(set("".join(texts))))

    def __len__(self):
        return len(SPECIALS) + len(self.chars)

    @property
    def size(self):
        return len(self)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.chars == other.chars

    def __repr__(self):
        return f"Vocab({''.join(self.chars)!r})"

    def encode(self, text, bos=True, eos=False, errors="strict"):
        """Encode ``text`` to an int64 array of ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        ids = [BOS] if bos else []
        for pos, c in enumerate(text):
            i = self._index.get(c)
            if i is None:
                if errors == "strict":
                    raise ValueError(f"character {c!r} at position {pos} of text is not in the vocabulary "
                                     f"(use errors='replace' to map it to UNK)")
                i = UNK
            ids.append(i)
        if eos:
            ids.append(EOS)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids):
        """Decode ids to text: stops at EOS, skips PAD and BOS, UNK -> U+FFFD."""
        out = []
        for i in np.asarray(ids).ravel().tolist():
            if i < 0 or i >= len(self):
                raise ValueError(f"id {i} is out of range for a vocabulary of size {len(self)}")
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append("\ufffd" if i == UNK else self.chars[i - len(SPECIALS)])
        return "".join(out)

    def to_json(self):
        return {"chars": "".join(self.chars), "specials": list(SPECIALS)}

    @classmethod
    def from_json(cls, d):
        if not isinstance(d, dict) or "chars" not in d:
            raise ValueError("vocabulary JSON must be an object with a 'chars' string")
        if list(d.get("specials", SPECIALS)) != list(SPECIALS):
            raise ValueError(f"vocabulary specials must be {list(SPECIALS)}, got {d.get('specials')}")
        return cls(d["chars"])


def pad_batch(seqs, pad_to=None):
    """Right-pad int sequences into (tokens (B, T) int64, mask (B, T) float64)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
    T = max([len(s) for s in seqs] + [0]) if pad_to is None else int(pad_to)
    if any(len(s) > T for s in seqs):
        raise ValueError(f"a sequence is longer than pad_to={T}")
    tokens = np.full((len(seqs), T), PAD, dtype=np.int64)
    mask = np.zeros((len(seqs), T))
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
        mask[b, :len(s)] = 1.0
    return tokens, mask
