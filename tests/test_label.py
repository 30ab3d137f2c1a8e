"""The terminal labeler, driven through a pseudo-terminal like a person at a keyboard."""

import json
import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

import rlhf_ref
from rlhf_ref.label import Candidate, _action, _Keys, load_candidates, pair_id, write_candidates
from rlhf_ref.preferences import PreferenceFileError, load_preferences, load_ratings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rlhf_ref.__file__)))
LEFT, RIGHT = b"\x1b[D", b"\x1b[C"
TIMEOUT = 10.0


class Pty:
    """Run ``python -m rlhf_ref.label args`` on a pseudo-terminal; read its screen, type keys."""

    def __init__(self, *args):
        self.master, self.slave = os.openpty()
        self.attrs = termios.tcgetattr(self.slave)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_ref.label", *map(str, args)],
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=env, start_new_session=True)
        self.out = b""

    def expect(self, text, count=1, timeout=TIMEOUT):
        """Read until ``text`` has appeared ``count`` times in all output so far."""
        text = text.encode() if isinstance(text, str) else text
        deadline = time.monotonic() + timeout
        while self.out.count(text) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r} x{count}; screen so far:\n"
                                     f"{self.out.decode(errors='replace')}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:           # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the labeler exited before {text!r} x{count}; screen:\n"
                                         f"{self.out.decode(errors='replace')}")
                self.out += chunk
        return self.out

    def key(self, k, then="key> "):
        """Type one key and wait for the next prompt (so the judgement is on disk)."""
        n = self.out.count(then.encode())
        os.write(self.master, k if isinstance(k, bytes) else k.encode())
        self.expect(then, n + 1)

    def wait(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:
                    pass
        return self.proc.wait(timeout=1)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_run():
    runs = []

    def start(*args):
        runs.append(Pty(*args))
        return runs[-1]

    yield start
    for r in runs:
        r.close()


@pytest.fixture
def cands(tmp_path):
    path = tmp_path / "cands.jsonl"
    write_candidates(path, [Candidate(f"c{i}", "the cat ", f"is glad{i}.", f"is sad{i}.") for i in range(6)])
    return path


def screen_ids(out):
    return [line.split(" · ")[0].split("id ")[-1] for line in out.decode().splitlines() if line.startswith("── id ")]


def test_judge_undo_skip_quit(pty_run, cands, tmp_path):
    out = tmp_path / "prefs.jsonl"
    p = pty_run(cands, "--out", out, "--no-swap")
    p.expect("key> ")
    p.key("1")                 # c0: left (a)
    p.key(RIGHT)               # c1: right (b)
    p.key("t")                 # c2: tie
    assert len(load_preferences(out, ties="keep")) == 3
    p.key("u")                 # undo the tie: c2 shown again
    assert len(load_preferences(out, ties="keep")) == 2
    p.key(LEFT)                # c2: left
    p.key("s")                 # c3: skipped
    p.key("x")                 # unknown key: a hint, same item again
    p.key("d")                 # c4: right
    os.write(p.master, b"q")
    assert p.wait() == 0
    assert termios.tcgetattr(p.slave) == p.attrs          # terminal restored
    text = p.out.decode()
    assert "undone: c2" in text and "skipped c3" in text and "unknown key" in text
    #            judged judged tie  (undo) c2 again  skip  "x"  "d"   (q)
    assert screen_ids(p.out) == ["c0", "c1", "c2", "c3", "c2", "c3", "c4", "c4", "c5"]
    recs = load_preferences(out, ties="keep")
    assert [r.meta["pair_id"] for r in recs] == ["c0", "c1", "c2", "c4"]
    assert [r.chosen for r in recs] == ["is glad0.", "is sad1.", "is glad2.", "is sad4."]
    assert [r.meta["choice"] for r in recs] == ["left", "right", "left", "right"]
    assert not any(r.tie for r in recs) and all(r.meta["judge"] == "human" for r in recs)


def test_kill_mid_session_loses_nothing_and_restart_resumes(pty_run, cands, tmp_path):
    out = tmp_path / "prefs.jsonl"
    p = pty_run(cands, "--out", out)           # swapped order (hash of seed and id)
    p.expect("key> ")
    shown = []
    for k in ["1", "2", "t", "a"]:
        shown.append(p.out.decode().splitlines())
        p.key(k)
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=TIMEOUT)
    raw = out.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.splitlines()]           # valid JSON Lines
    assert [d["pair_id"] for d in lines] == ["c0", "c1", "c2", "c3"]
    assert [d.get("tie", False) for d in lines] == [False, False, True, False]
    assert len(load_preferences(out)) == 3                            # the tie is not BT data
    # chosen follows the screen: "1" picked what was shown on the left
    left0 = [s for s in shown[0] if "[1] left :" in s][-1].split("the cat ")[-1]
    assert lines[0]["chosen"] == left0
    assert lines[0]["left"] in ("a", "b")

    q = pty_run(cands, "--out", out)
    q.expect("key> ")
    assert "6 items, 4 already in" in q.out.decode()
    assert screen_ids(q.out) == ["c4"]                               # resumes after the judged pairs
    q.key("2")
    os.write(q.master, b"q")
    assert q.wait() == 0
    assert [r.meta["pair_id"] for r in load_preferences(out, ties="keep")] == ["c0", "c1", "c2", "c3", "c4"]


def test_sigterm_restores_the_terminal_and_keeps_the_file(pty_run, cands, tmp_path):
    out = tmp_path / "prefs.jsonl"
    p = pty_run(cands, "--out", out)
    p.expect("key> ")
    p.key("1")
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM
    assert termios.tcgetattr(p.slave) == p.attrs
    assert len(load_preferences(out)) == 1


def test_rating_mode(pty_run, tmp_path):
    cands = tmp_path / "c.jsonl"
    write_candidates(cands, [{"id": "p", "prompt": "tom ", "a": "runs.", "b": "sings."},
                             {"id": "s", "prompt": "mia ", "response": "is glad."}])
    out = tmp_path / "ratings.jsonl"
    p = pty_run(cands, "--out", out, "--mode", "rating")
    p.expect("key> ")
    p.key("5")
    p.key("u")
    p.key("4")
    p.key("t")                  # not a rating key
    p.key("2")
    os.write(p.master, b"1")
    p.expect("all items judged")
    assert p.wait() == 0
    recs = load_ratings(out)
    assert [(r.meta["item_id"], r.response, r.rating) for r in recs] == [("p/a", "runs.", 4), ("p/b", "sings.", 2),
                                                                         ("s", "is glad.", 1)]


def test_refuses_without_a_terminal(cands, tmp_path):
    out = tmp_path / "prefs.jsonl"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "rlhf_ref.label", str(cands), "--out", str(out)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0
    assert "rlhf-ref label needs an interactive terminal" in r.stderr
    assert not out.exists()


def test_bad_inputs_give_clear_errors(pty_run, tmp_path):
    cands = tmp_path / "c.jsonl"
    cands.write_text('{"id": "a", "prompt": "p", "a": "x", "b": "y"}\n{"id": "a", "prompt": "p", "a": "x", "b": "z"}\n')
    with pytest.raises(PreferenceFileError, match=r"c\.jsonl:2: id 'a' already used on line 1"):
        load_candidates(cands)
    p = pty_run(cands, "--out", tmp_path / "o.jsonl")
    assert p.wait() == 2
    assert b"already used on line 1" in p.out
    single = tmp_path / "s.jsonl"
    write_candidates(single, [{"prompt": "p", "response": "r"}])
    p = pty_run(single, "--out", tmp_path / "o.jsonl")
    assert p.wait() == 2
    assert b"pair mode needs 'a' and 'b'" in p.out
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "cho')
    good = tmp_path / "good.jsonl"
    write_candidates(good, [("p", "a", "b")])
    p = pty_run(good, "--out", broken)
    assert p.wait() == 2
    assert b"broken.jsonl:2: not valid JSON" in p.out and b"cut off mid-write" in p.out


def test_candidates_round_trip_and_stable_ids(tmp_path):
    path = tmp_path / "c.jsonl"
    written = write_candidates(path, [("the cat ", "is glad.", "is sad."), {"prompt": "tom ", "response": "runs."}])
    assert load_candidates(path) == written
    assert written[0].id == pair_id("the cat ", "is glad.", "is sad.") and len(written[0].id) == 16
    assert written[1].id == pair_id("tom ", "runs.") and not written[1].is_pair
    with pytest.raises(ValueError, match="repeats id"):
        write_candidates(path, [("p", "a", "b"), ("p", "a", "b")])
    with pytest.raises(ValueError, match="either 'a' and 'b'"):
        write_candidates(path, [{"prompt": "p"}])


def test_key_decoding():
    r, w = os.pipe()
    try:
        os.write(w, b"\x1b[Dq1\x1bOC2\x1b")
        keys = _Keys(r)
        got = [keys.read() for _ in range(6)]
        assert got == [LEFT, b"q", b"1", b"\x1bOC", b"2", b"\x1b"]     # a lone Esc after 50 ms
    finally:
        os.close(r)
        os.close(w)
    assert [_action(k, "pair") for k in (b"1", b"a", LEFT, b"2", b"d", RIGHT, b"t", b"s", b"u", b"q", b"\x04", b"z")] \
        == ["left", "left", "left", "right", "right", "right", "tie", "skip", "undo", "quit", "quit", None]
    assert [_action(k, "rating") for k in (b"1", b"5", b"6", b"t")] == [("rate", 1), ("rate", 5), None, None]


def test_cli_registers_label():
    from rlhf_ref import cli, label
    parser = cli.build_parser(["label"])
    args = parser.parse_args(["label", "c.jsonl", "--out", "o.jsonl", "--mode", "rating", "--no-swap", "--seed", "3"])
    assert (args._command.load().main, args.candidates, args.out, args.mode, args.swap, args.seed) == \
        (label.main, "c.jsonl", "o.jsonl", "rating", False, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["label", "c.jsonl", "--out", "o.jsonl", "--mode", "stars"])
