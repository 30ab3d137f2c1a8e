"""Per-iteration metrics and progress display for the training stages.

Metrics are JSON Lines: one JSON object per line, flushed as it is written, so a killed run
keeps every row it logged and ``tail -f`` shows training live. Every row carries the stage
name and the iteration ``step`` (counted from 1); the other fields are the stage's metrics
(losses, rewards, KL per sequence, entropy, tokens/s, ...). Non-finite floats are written as
``null`` (strict JSON has no NaN).

When a stage resumes from a checkpoint taken after step k, ``MetricsLogger(path, resume_step=k)``
drops the rows after step k first (writing a new file and renaming it, never truncating in
place), so the file of a resumed run holds the same steps as that of an uninterrupted one.

Progress: ``Progress`` shows a tqdm bar on a terminal when tqdm is installed, a one-line
``\\r`` bar on a terminal without it, and — when the stream is not a terminal (a log file, a
pipe, pytest) — a few plain lines (about every 10 %), nothing fancy.

    log = MetricsLogger("run/metrics/rl.jsonl"); log.log({"stage": "rl", "step": 1, "loss": 0.3})
    rows = read_metrics("run/metrics/rl.jsonl")          # validated: an error names file and line
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

__all__ = ["MetricsLogger", "read_metrics", "Progress", "jsonable"]


def jsonable(x):
    """Convert NumPy scalars/arrays and non-finite floats into strict-JSON values."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


class MetricsLogger:
    """Append metric rows to a JSON Lines file, one flushed line per row.

    path         the .jsonl file (its folder is created)
    resume_step  None: start a fresh file; k: keep the rows with step <= k, drop the rest

    The file survives a kill at any instant: rows are only ever appended; a fresh start or a
    resume that drops rows writes the kept rows to a new file and renames it over the old one
    (``rlhf_ref.io.atomic_open``), never truncating in place. On resume a torn last line (a kill
    in the middle of a write: no newline at its end) is dropped, and stale temporaries of a
    killed rewrite are removed.
    """

    def __init__(self, path, resume_step=None):
        from .io import atomic_open, clean_stale_temps
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        clean_stale_temps(folder or ".", names={os.path.basename(self.path)})
        keep = None                                    # None: the file stays as it is
        if resume_step is None:
            keep = []
        elif os.path.lexists(self.path):
            lines, torn = _metric_lines(self.path)
            kept = [raw for raw, row in lines if row["step"] <= int(resume_step)]
            if torn or len(kept) != len(lines):
                keep = kept
        if keep is not None:
            with atomic_open(self.path, "wb") as f:      # write new, rename: the old file is whole until then
                f.write(b"".join(raw + b"\n" for raw in keep))
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, row):
        """Write one row (a dict) and flush it to the file."""
        if not isinstance(row, dict):
            raise TypeError(f"a metrics row must be a dict, got {type(row).__name__}")
        self._f.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
        self._f.flush()

    def close(self):
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _metric_lines(path):
    """([(raw line bytes, row dict)], torn) of a metrics file read through ``safe_read``; ``torn``
    is True when the last line has no newline (a write cut by a kill) — that line is left out.
    Any other bad line raises ``FileReadError`` naming the file and line."""
    from .safe_read import FileReadError, loads_json, read_bytes
    data = read_bytes(path, what="metrics file")
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    lines.pop()                     # after the last newline: b"" or the torn line
    out = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        row = loads_json(raw, path, lineno, what="metrics row")
        if not isinstance(row, dict):
            raise FileReadError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
        if "step" not in row or "stage" not in row:
            raise FileReadError(path, "a metrics row needs 'stage' and 'step'", line=lineno)
        if isinstance(row["step"], bool) or not isinstance(row["step"], int):
            raise FileReadError(path, f"'step' must be an integer, got {row['step']!r:.60}", line=lineno)
        out.append((raw, row))
    return out, torn


def read_metrics(path):
    """Read a metrics JSON Lines file into a list of dicts; a bad line raises ``FileReadError``
    (a ValueError) naming file and line. A torn last line (no newline: the writer was killed
    mid-row) is left out."""
    return [row for _, row in _metric_lines(os.fspath(path))[0]]


def _isatty(stream):
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class Progress:
    """A progress display for one stage: tqdm / a plain \\r bar on a terminal, a few lines otherwise.

    mode  "auto" (the default), "tqdm", "bar", "lines" or "off"
    """

    def __init__(self, total, desc, initial=0, stream=None, mode="auto"):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._tqdm = None
        if mode == "auto":
            mode = "lines"
            if _isatty(self.stream):
                mode = "bar"
                try:
                    import tqdm  # noqa: F401
                    mode = "tqdm"
                except Exception:
                    pass
        if mode not in ("tqdm", "bar", "lines", "off"):
            raise ValueError(f"mode must be one of auto, tqdm, bar, lines, off; got {mode!r}")
        self.mode = mode
        if mode == "tqdm":
            from tqdm.auto import tqdm
            self._tqdm = tqdm(total=self.total, initial=self.n, desc=desc, file=self.stream,
                              dynamic_ncols=True, leave=True)
        self._next_line = self._line_mark(self.n)

    def _line_mark(self, n):
        step = max(1, self.total // 10)
        return (n // step + 1) * step

    def update(self, n=1, **postfix):
        """Advance by n; keyword arguments are shown beside the bar (floats to 4 significant digits)."""
        self.n += n
        if postfix:
            self.postfix = "  ".join(f"{k}={v:.4g}" if isinstance(v, (float, np.floating)) else f"{k}={v}"
                                     for k, v in postfix.items())
        if self.mode == "tqdm":
            if postfix:
                self._tqdm.set_postfix_str(self.postfix, refresh=False)
            self._tqdm.update(n)
        elif self.mode == "bar":
            frac = self.n / max(self.total, 1)
            width = 24
            fill = int(round(frac * width))
            self.stream.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] "
                              f"{self.n}/{self.total}  {self.postfix}\x1b[K")
            self.stream.flush()
        elif self.mode == "lines":
            if self.n >= self._next_line or self.n == self.total:
                self._line()
                self._next_line = self._line_mark(self.n)

    def _line(self):
        el = time.perf_counter() - self._t0
        self.stream.write(f"{self.desc} {self.n}/{self.total}  {self.postfix}  ({el:.1f}s)\n")
        self.stream.flush()

    def close(self):
        if self.mode == "tqdm" and self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        elif self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()
            self.mode = "off"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
