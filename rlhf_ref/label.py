"""``rlhf-ref label``: collect human judgements in the terminal, one key press each, crash-safe.

A person sees a prompt and two responses (pair mode) or one response (rating mode) and answers
with a single key, no Enter:

    pair mode     1, a, ← (left arrow)   prefer left         rating mode   1 … 5   the rating
                  2, d, → (right arrow)  prefer right
                  t                      tie
    both modes    s skip (not recorded; offered again next session)   u undo the last judgement
                  q quit (also Ctrl-D; Ctrl-C and SIGTERM quit too, leaving the terminal restored)

**Candidates** (the input) are JSON Lines, one object per line::

    {"id": "c0001", "prompt": "the cat ", "a": "looks happy.", "b": "is sad."}     a pair
    {"id": "c0002", "prompt": "the cat ", "response": "looks happy."}             a single text

``id`` is a non-empty string, unique in the file, that identifies the candidate for good (it is
what lets a session resume); ``write_candidates`` writes such a file and fills in missing ids with
a content hash (``pair_id``). Pair mode needs pairs; rating mode rates a single text once and each
side of a pair once (item ids ``<id>/a`` and ``<id>/b``). A policy checkpoint becomes candidates by
sampling two responses per prompt and calling ``write_candidates``.

**Output** is a preference file (pair mode) or a ratings file (rating mode) in the formats of
``rlhf_ref.preferences``. Each judgement is appended as one line the moment the key is pressed,
flushed and fsynced, so a killed process loses nothing. Metadata on each line::

    pair mode:    "pair_id": id, "choice": "left"|"right"|"tie", "left": "a"|"b", "judge": "human", "time": unix s
    rating mode:  "item_id": id, "judge": "human", "time": unix s

A tie is recorded (so a restart does not ask again) as ``"tie": true`` with chosen = left and
rejected = right; ``load_preferences`` drops ties by default, so they never enter Bradley–Terry
training. **Undo** removes the file's last line by rewriting the file atomically without it (the
file always holds exactly the current judgements: no tombstones, nothing for a loader to
interpret) and shows that item again; it refuses, with a message, a last line whose id is not in
this candidate file. **Resume**: items whose id is already in the output file are skipped. To avoid
position bias the two responses of a pair are shown in an order fixed by a hash of (seed, id),
so a resumed session shows them the same way.

The terminal is put in cbreak mode (no echo, no line buffering, signals still delivered) through
termios and restored in a ``finally``, also on SIGTERM/SIGHUP (SIGCONT re-applies cbreak after a
Ctrl-Z). It works when driven by another program through a pseudo-terminal, and refuses to start
when stdin is not a terminal (``NoTerminalError``; exit status 2 from the command).

    run_labeler(pairs_source, out_path, mode="pair", *, swap=True, seed=0, stdin=None, stdout=None) -> dict
    add_arguments(parser) / main(args) -> int          (rlhf-ref label; python -m rlhf_ref.label)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import stat
import sys
import time
import zlib
from dataclasses import dataclass

from .io import atomic_write_bytes, atomic_write_text
from .preferences import (Preference, PreferenceFileError, Rating, append_preference, append_rating,
                          load_preferences, load_ratings)

__all__ = ["Candidate", "NoTerminalError", "pair_id", "write_candidates", "load_candidates", "run_labeler",
           "add_arguments", "main"]

NO_TERMINAL = ("rlhf-ref label needs an interactive terminal; stdin is not a terminal. Run it in a "
               "terminal (or drive it through a pseudo-terminal), not with input from a pipe or a file.")


class NoTerminalError(RuntimeError):
    """stdin is not a terminal, so nobody can press keys."""


class _Terminated(Exception):
    def __init__(self, signum):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@dataclass(frozen=True)
class Candidate:
    """One thing to judge: a pair (a and b) or a single response (b is None)."""

    id: str
    prompt: str
    a: str
    b: str | None = None

    @property
    def is_pair(self):
        return self.b is not None

    def to_dict(self):
        d = {"id": self.id, "prompt": self.prompt}
        d.update({"a": self.a, "b": self.b} if self.is_pair else {"response": self.a})
        return d


def pair_id(prompt, a, b=None):
    """A stable id from the content: the first 16 hex digits of sha256(prompt, a[, b])."""
    parts = [prompt, a] + ([] if b is None else [b])
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _candidate_from_dict(d, require_id=True):
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    has_pair, has_single = ("a" in d or "b" in d), "response" in d
    if has_pair == has_single:
        raise ValueError("a candidate needs either 'a' and 'b' (a pair) or 'response' (a single text)")
    keys = ("prompt", "a", "b") if has_pair else ("prompt", "response")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for k in keys:
        if not isinstance(d[k], str):
            raise ValueError(f"field {k!r} must be a string, got {d[k]!r:.60}")
    cid = d.get("id")
    if cid is None and not require_id:
        cid = pair_id(d["prompt"], d["a"], d["b"]) if has_pair else pair_id(d["prompt"], d["response"])
    if not isinstance(cid, str) or not cid or "/" in cid:
        raise ValueError(f"field 'id' must be a non-empty string without '/', got {cid!r:.60}")
    return Candidate(cid, d["prompt"], d["a"], d["b"]) if has_pair else Candidate(cid, d["prompt"], d["response"])


def write_candidates(path, candidates):
    """Write candidates atomically as JSON Lines; returns the list of Candidates written.

    Each entry is a ``Candidate``, a dict (``{"prompt", "a", "b"[, "id"]}`` or
    ``{"prompt", "response"[, "id"]}``) or a tuple ``(prompt, a, b)``. Missing ids become
    ``pair_id(...)``; duplicate ids are an error.
    """
    out, seen = [], {}
    for i, c in enumerate(candidates):
        if isinstance(c, tuple):
            if len(c) != 3:
                raise ValueError(f"candidates[{i}] as a tuple must be (prompt, a, b), got {len(c)} items")
            c = {"prompt": c[0], "a": c[1], "b": c[2]}
        if isinstance(c, dict):
            try:
                c = _candidate_from_dict(c, require_id=False)
            except ValueError as e:
                raise ValueError(f"candidates[{i}]: {e}") from None
        elif not isinstance(c, Candidate):
            raise TypeError(f"candidates[{i}] must be a Candidate, dict or (prompt, a, b), got {type(c).__name__}")
        if c.id in seen:
            raise ValueError(f"candidates[{i}] repeats id {c.id!r} (first at candidates[{seen[c.id]}])")
        seen[c.id] = i
        out.append(c)
    atomic_write_text(path, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in out))
    return out


def load_candidates(path):
    """Candidates from a JSON Lines file; errors name the file and line (blank lines ignored).

    Read through ``rlhf_ref.safe_read``: a regular file within the size limit; a line nested too
    deeply, with a duplicate key or a lone surrogate (text no terminal or file can hold) is refused."""
    from .safe_read import FileReadError, loads_json, no_duplicate_keys, read_bytes
    name = os.fspath(path)
    out, seen = [], {}
    try:
        data = read_bytes(name, what="candidates file")
    except FileReadError as e:
        raise PreferenceFileError(name, None, e.what) from None
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            c = _candidate_from_dict(loads_json(raw, name, i, what="line", object_pairs_hook=no_duplicate_keys))
        except FileReadError as e:
            raise PreferenceFileError(name, i, f"not a valid candidate: {e.what}") from None
        except (ValueError, TypeError) as e:
            raise PreferenceFileError(name, i, f"not a valid candidate: {e}") from None
        if c.id in seen:
            raise PreferenceFileError(name, i, f"id {c.id!r} already used on line {seen[c.id]}")
        seen[c.id] = i
        out.append(c)
    return out


# ----------------------------------------------------------------------------- keys
_ESC = b"\x1b"
_ARROWS = {b"\x1b[D": "left", b"\x1bOD": "left", b"\x1b[C": "right", b"\x1bOC": "right"}


class _Keys:
    """Single key presses from a terminal file descriptor (arrow keys decoded)."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def _fill(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        data = os.read(self.fd, 64)
        if not data:
            raise EOFError
        self.buf += data
        return True

    def read(self):
        """The next key as bytes; EOFError when the terminal closes."""
        while not self.buf:
            self._fill(None)
        if self.buf[:1] == _ESC:
            while len(self.buf) < 3 and self._fill(0.05):
                pass
            if len(self.buf) >= 3 and self.buf[1:2] in (b"[", b"O"):
                key, self.buf = self.buf[:3], self.buf[3:]
                return key
        key, self.buf = self.buf[:1], self.buf[1:]
        return key


def _action(key, mode):
    if key in (b"q", b"Q", b"\x04"):
        return "quit"
    if key in (b"u", b"U"):
        return "undo"
    if key in (b"s", b"S"):
        return "skip"
    if mode == "rating":
        return ("rate", int(key)) if key in (b"1", b"2", b"3", b"4", b"5") else None
    if key in (b"1", b"a", b"A") or _ARROWS.get(key) == "left":
        return "left"
    if key in (b"2", b"d", b"D") or _ARROWS.get(key) == "right":
        return "right"
    if key in (b"t", b"T"):
        return "tie"
    return None


# ----------------------------------------------------------------------------- the session
def _items(cands, mode):
    """[(item_id, candidate, side)] — side None for a pair judgement, 'a'/'b' or None for ratings."""
    items = []
    for c in cands:
        if mode == "pair":
            if not c.is_pair:
                raise ValueError(f"candidate {c.id!r} is a single response; pair mode needs 'a' and 'b' "
                                 f"(use mode='rating' to rate single responses)")
            items.append((c.id, c, None))
        elif c.is_pair:
            items += [(c.id + "/a", c, "a"), (c.id + "/b", c, "b")]
        else:
            items.append((c.id, c, None))
    return items


def _swapped(seed, cid):
    return bool(zlib.crc32(f"{seed}\x1f{cid}".encode("utf-8")) & 1)


def _open_append(path):
    """The output file opened for appending: a regular file, never through a symlink (O_NOFOLLOW),
    never blocking on a FIFO (O_NONBLOCK). Temporaries of an undo killed mid-rewrite are removed."""
    from .io import clean_stale_temps
    clean_stale_temps(os.path.dirname(os.path.abspath(path)), names={os.path.basename(path)})
    existed = os.path.lexists(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise PreferenceFileError(path, None, f"cannot open the output file for appending: {e.strerror or e} "
                                              f"(it must be a regular file, not a symbolic link)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PreferenceFileError(path, None, "the output file is not a regular file")
    fh = os.fdopen(fd, "ab", buffering=0)
    if not existed:
        os.fsync(fh.fileno())
        from .io import _fsync_dir
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return fh


def _drop_last_line(path):
    """Rewrite ``path`` atomically without its last non-blank line; returns that line (str)."""
    from .safe_read import read_bytes
    lines = read_bytes(path, what="output file").split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    last = lines.pop()
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))
    return last.decode("utf-8")


def _show(text):
    """Text safe to print on a terminal: control characters shown as escapes, never sent raw."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class _Screen:
    def __init__(self, out):
        self.out = out
        self.enc = getattr(out, "encoding", None) or "utf-8"

    def ask(self, text):
        self.out.write(text.encode(self.enc, "replace").decode(self.enc))
        self.out.flush()

    def say(self, text=""):
        self.ask(text + "\n")


def run_labeler(pairs_source, out_path, mode="pair", *, swap=True, seed=0, stdin=None, stdout=None):
    """Label candidates interactively; returns ``{"judged", "undone", "skipped", "in_file", "remaining", "quit"}``.

    pairs_source: a candidates JSONL path, or an iterable of ``Candidate``/dicts.
    out_path: the preference (pair mode) or ratings (rating mode) JSONL file, created or resumed.
    stdin/stdout: file objects of the terminal (default ``sys.stdin``/``sys.stdout``).
    Raises ``NoTerminalError`` when stdin is not a terminal, before reading or writing any file.
    """
    if mode not in ("pair", "rating"):
        raise ValueError(f"mode must be 'pair' or 'rating', got {mode!r}")
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    try:
        fd = stdin.fileno()
        is_tty = os.isatty(fd)
    except (AttributeError, ValueError, OSError):
        is_tty = False
    if not is_tty:
        raise NoTerminalError(NO_TERMINAL)
    import termios
    import tty

    if isinstance(pairs_source, (str, os.PathLike)):
        cands = load_candidates(pairs_source)
    else:
        cands = [c if isinstance(c, Candidate) else _candidate_from_dict(c) for c in pairs_source]
    items = _items(cands, mode)
    by_id = {iid: (iid, c, side) for iid, c, side in items}
    out_path = os.fspath(out_path)
    id_key = "pair_id" if mode == "pair" else "item_id"
    existing = []
    if os.path.lexists(out_path):
        existing = load_preferences(out_path, ties="keep") if mode == "pair" else load_ratings(out_path)
    done = {r.meta.get(id_key) for r in existing}
    pending = [it for it in items if it[0] not in done]
    in_file = len(existing)
    screen = _Screen(stdout)
    stats = {"judged": 0, "undone": 0, "skipped": 0}

    old_attrs = termios.tcgetattr(fd)
    old_handlers = {}

    def on_signal(signum, frame):
        raise _Terminated(signum)

    def on_cont(signum, frame):
        try:
            tty.setcbreak(fd, termios.TCSANOW)
        except termios.error:
            pass

    fh = None
    quit_ = False
    try:
        try:
            for s, h in ((signal.SIGTERM, on_signal), (signal.SIGHUP, on_signal), (signal.SIGCONT, on_cont)):
                old_handlers[s] = signal.signal(s, h)
        except ValueError:      # not the main thread: no handlers, the finally still restores
            pass
        tty.setcbreak(fd, termios.TCSANOW)      # TCSANOW: keep keys typed ahead
        fh = _open_append(out_path)
        keys = _Keys(fd)
        screen.say(f"rlhf-ref label · {mode} mode · {len(items)} items, {len(items) - len(pending)} already "
                   f"in {out_path}, {len(pending)} to go")
        if mode == "pair":
            screen.say("keys: 1/a/← prefer left · 2/d/→ prefer right · t tie · s skip · u undo · q quit")
        else:
            screen.say("keys: 1-5 rate (5 best) · s skip · u undo · q quit")
        skipped = []
        i = 0
        while i < len(pending):
            iid, c, side = pending[i]
            screen.say("")
            screen.say(f"── id {iid} · {len(done.intersection(by_id))} of {len(items)} judged · "
                       f"{in_file} in file ──")
            screen.say(f"prompt: {_show(c.prompt)}")
            if mode == "pair":
                sw = swap and _swapped(seed, c.id)
                left, right = (c.b, c.a) if sw else (c.a, c.b)
                screen.say(f"  [1] left : {_show(c.prompt + left)}")
                screen.say(f"  [2] right: {_show(c.prompt + right)}")
            else:
                text = c.a if side in (None, "a") else c.b
                screen.say(f"  text: {_show(c.prompt + text)}")
            screen.ask("key> ")
            try:
                key = keys.read()
            except EOFError:
                screen.say("")
                screen.say("terminal closed: stopping")
                quit_ = True
                break
            act = _action(key, mode)
            screen.say("")
            if act is None:
                screen.say(f"unknown key {key!r}; " + ("1/a/← left, 2/d/→ right, t tie" if mode == "pair"
                                                        else "1-5 rate") + ", s skip, u undo, q quit")
                continue
            if act == "quit":
                quit_ = True
                break
            if act == "skip":
                stats["skipped"] += 1
                skipped.append(pending.pop(i))
                screen.say(f"skipped {iid} (not recorded; offered again next time)")
                continue
            if act == "undo":
                fh.close()
                fh = None
                try:
                    undone, message = _undo(out_path, id_key, by_id)
                finally:
                    fh = _open_append(out_path)
                screen.say(message)
                if undone is None:
                    continue
                in_file -= 1
                done.discard(undone)
                stats["undone"] += 1
                before = [p[0] for p in pending[:i]]
                if undone in before:                      # judged earlier in this session
                    pending.pop(before.index(undone))
                    i -= 1
                pending.insert(i, by_id[undone])
                continue
            meta = {id_key: iid}
            now = round(time.time(), 3)
            if mode == "pair":
                if act == "tie":
                    rec = Preference(c.prompt, left, right, None,
                                     {**meta, "choice": "tie", "left": "b" if sw else "a", "tie": True,
                                      "judge": "human", "time": now})
                else:
                    chosen, rejected = (left, right) if act == "left" else (right, left)
                    rec = Preference(c.prompt, chosen, rejected, None,
                                     {**meta, "choice": act, "left": "b" if sw else "a", "judge": "human",
                                      "time": now})
                append_preference(fh, rec)
                what = {"left": "left preferred", "right": "right preferred", "tie": "tie"}[act]
            else:
                rec = Rating(c.prompt, text, act[1], {**meta, "judge": "human", "time": now})
                append_rating(fh, rec)
                what = f"rating {act[1]}"
            in_file += 1
            done.add(iid)
            stats["judged"] += 1
            screen.say(f"saved: {what} ({in_file} in file)")
            i += 1
        else:
            pending_left = len(skipped)
            screen.say("")
            screen.say(f"all items judged ({in_file} in {out_path})" if not pending_left else
                       f"end of the list; {pending_left} skipped item(s) will be offered again next time")
        if quit_:
            screen.say(f"quit: {in_file} judgements in {out_path}; run the same command to resume")
    except _Terminated as e:
        try:
            screen.say(f"\nstopped by signal {e.signum}: {in_file} judgements in {out_path}")
        except OSError:          # the terminal may be gone (SIGHUP)
            pass
        raise
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, old_attrs)
        except termios.error:    # the terminal is gone (hang-up): nothing left to restore
            pass
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if fh is not None:
            fh.close()
    remaining = sum(1 for it in items if it[0] not in done)
    return {**stats, "in_file": in_file, "remaining": remaining, "quit": quit_}


def _undo(path, id_key, by_id):
    """Remove the file's last judgement if it is an item of this session: (item id or None, message)."""
    from .safe_read import read_bytes
    lines = [ln for ln in read_bytes(path, what="output file").split(b"\n") if ln.strip()]
    if not lines:
        return None, "nothing to undo"
    try:
        rid = json.loads(lines[-1].decode("utf-8")).get(id_key)
    except (ValueError, AttributeError):
        rid = None
    if rid not in by_id:
        return None, (f"cannot undo: the last line of {path} ({id_key} {rid!r}) is not an item of this "
                      f"candidate file; edit the file by hand if you mean it")
    _drop_last_line(path)
    return rid, f"undone: {rid} removed from {path}; showing it again"


# ----------------------------------------------------------------------------- command line
def add_arguments(p):
    """The ``rlhf-ref label`` arguments."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("keys (pair mode): 1/a/left prefer left, 2/d/right prefer right, t tie, s skip, u undo, q quit; "
                "rating mode: 1-5. Each judgement is on disk when its key is pressed; rerun to resume.")
    p.add_argument("candidates", help="candidates JSON Lines file: {id, prompt, a, b} per line "
                                      "(or {id, prompt, response} for rating mode)")
    p.add_argument("-o", "--out", required=True, help="output JSON Lines file (created, or resumed)")
    p.add_argument("--mode", choices=("pair", "rating"), default="pair",
                   help="pair: prefer left/right/tie (default); rating: 1-5")
    p.add_argument("--no-swap", dest="swap", action="store_false",
                   help="always show a on the left (default: order fixed by a hash of seed and id)")
    p.add_argument("--seed", type=int, default=0, help="seed of the left/right order (default 0)")
    return p


def main(args):
    """Run the labeler for parsed ``args``; returns the exit status (0 done/quit, 2 bad input or no
    terminal, 130 Ctrl-C, 128+n on signal n)."""
    try:
        run_labeler(args.candidates, args.out, args.mode, swap=args.swap, seed=args.seed)
    except NoTerminalError as e:
        print(f"rlhf-ref label: error: {e}", file=sys.stderr)
        return 2
    except (PreferenceFileError, ValueError, OSError) as e:
        print(f"rlhf-ref label: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every judgement made so far is saved", file=sys.stderr)
        return 130
    except _Terminated as e:
        return 128 + e.signum
    return 0


if __name__ == "__main__":                 # python -m rlhf_ref.label ...: the same as rlhf-ref label ...
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="rlhf-ref label",
                                                        description=__doc__.split("\n\n")[0])).parse_args()))
