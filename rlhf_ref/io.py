"""Files users keep: atomic writes and checkpoints (``.npz`` + JSON manifest), never pickle.

Atomic write (docs/conventions.md §6): the data go to a temporary file in the destination's folder
(``tempfile.mkstemp``), are flushed and fsynced, then ``os.replace`` puts the file in place and
the folder is fsynced. A reader sees the old file or the new one, never half of one; on any
exception the temporary file is removed and the destination is untouched. New files get mode
``0o666 & ~umask`` (umask read once at import), replaced files keep their mode.

    atomic_write_bytes(path, data)     atomic_write_text(path, text, encoding="utf-8")
    with atomic_open(path, "wb") as f: ...        ("wb" or "w")

Checkpoint = two files next to each other, written npz first, then manifest::

    <path>.npz    a NumPy zip archive, one ``<name>.npy`` member per array, written by
                  ``np.lib.format.write_array(..., allow_pickle=False)`` (the same members
                  ``np.savez`` writes, with fixed timestamps so equal arrays give equal bytes)
    <path>.json   {"schema": "rlhf_ref.checkpoint", "schema_version": 1,
                   "rlhf_ref_version": "...", "npz": "<file name of the npz>",
                   "sha256": "<hex digest of the npz bytes>",
                   "arrays": {name: {"shape": [...], "dtype": "<f8"}, ...},
                   ...every key of the caller's manifest (recommended: "config", "vocab", "state")}

Array names are any non-empty strings without NUL, so a pipeline may keep several models in one
checkpoint with prefixes (``policy/embedding.weight``, ``ref/…``, ``value/…``, ``adam/m/…``)
and its JSON state (step counters, ``generator_state(rng)``) in the manifest. Object arrays are
refused before anything is written. ``load_checkpoint`` reads with ``allow_pickle=False`` and
checks, in order: the manifest exists and is a JSON object of this schema and version, the npz
exists and its sha256 matches (a crash between the two writes shows up here), it opens as a
zip of ``.npy`` members without pickles, and names, shapes and dtypes match the manifest.
Every failure is a ``CheckpointError`` (a ``safe_read.FileReadError``, a ``ValueError``) whose
message is ``<file>: <what is wrong>``; every file is read through ``rlhf_ref.safe_read``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io as _io
import json
import math
import os
import re
import stat
import tempfile
import zipfile

import numpy as np

from . import safe_read
from .safe_read import FileReadError

__all__ = ["atomic_open", "clean_stale_temps", "remove_regular_file", "atomic_write_bytes", "atomic_write_text", "CheckpointError",
           "save_checkpoint", "load_checkpoint", "checkpoint_paths", "generator_state",
           "generator_from_state", "to_jsonable", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA = "rlhf_ref.checkpoint"
SCHEMA_VERSION = 1
_RESERVED = ("schema", "schema_version", "rlhf_ref_version", "npz", "sha256", "arrays")

_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:          # e.g. platforms that cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_path(path, name="path"):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{name} must be a non-empty path")
    return path


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding="utf-8"):
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    ``mode`` is "wb" (binary) or "w" (text, ``encoding``). On an exception inside the block the
    temporary file is removed, ``path`` is left as it was, and the exception propagates.
    """
    path = _check_path(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    try:
        perm = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        perm = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding, "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, perm)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def clean_stale_temps(folder, names=None, prefix=None):
    """Remove the temporary files ``atomic_open`` leaves when killed (``.<name>.XXXXXXXX.tmp``)
    from ``folder``: all of them, or those of the file names in ``names``, or of the names that
    start with ``prefix``. Only regular files are
    removed (never a link or a folder). Call it when resuming, not while another process writes
    into ``folder``. Returns the paths removed."""
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for fn in entries:
        m = _TEMP_NAME.match(fn)
        if m is None or (names is not None and m.group("name") not in names) \
                or (prefix is not None and not m.group("name").startswith(prefix)):
            continue
        p = os.path.join(folder, fn)
        if remove_regular_file(p):
            removed.append(p)
    return removed


def remove_regular_file(path):
    """Remove ``path`` if it is a regular file (never a link, folder or device); True if removed."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    return False


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes-like) to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text, encoding="utf-8"):
    """Write ``text`` (str) to ``path`` atomically (no newline translation)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


# ----------------------------------------------------------------------------- JSON helpers
def to_jsonable(obj, where="manifest"):
    """``obj`` as plain JSON types: dataclasses → dicts, NumPy scalars → Python numbers,
    tuples → lists; refuses NaN/inf, non-string keys and anything else with a ValueError/TypeError
    naming the place (``where``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise ValueError(f"{where} must be finite to be stored as JSON, got {obj!r}")
        return float(obj)
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        return to_jsonable(obj.item(), where)
    raise TypeError(f"{where} has a value of type {type(obj).__name__} that JSON cannot hold: {obj!r:.80}")


def generator_state(rng):
    """The JSON-able state of an ``np.random.Generator`` (its bit generator's ``state`` dict)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return to_jsonable(rng.bit_generator.state, "rng state")


def generator_from_state(state):
    """A new ``np.random.Generator`` continuing exactly from ``generator_state(rng)``."""
    if not isinstance(state, dict) or not isinstance(state.get("bit_generator"), str):
        raise ValueError("state must be a dict with a 'bit_generator' name, as generator_state returns")
    name = state["bit_generator"]
    cls = getattr(np.random, name, None)
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise ValueError(f"state names an unknown bit generator {name!r}")
    bg = cls()
    bg.state = state
    return np.random.Generator(bg)


# ----------------------------------------------------------------------------- checkpoints
class CheckpointError(FileReadError):
    """A checkpoint that cannot be written or read: ``<file>: <the cause>``.

    ``CheckpointError(path, what)``; ``CheckpointError(message)`` (one argument) keeps the
    message as given."""

    def __init__(self, path, what=None, line=None):
        if what is None:
            ValueError.__init__(self, path)
            self.path, self.what, self.line = None, path, None
        else:
            super().__init__(path, what, line)


def checkpoint_paths(path):
    """``(npz_path, manifest_path)`` for a checkpoint stem; a trailing ``.npz``/``.json`` is dropped."""
    path = _check_path(path)
    for ext in (".npz", ".json"):
        if path.endswith(ext):
            path = path[: -len(ext)]
    return path + ".npz", path + ".json"


def _npz_bytes(arrays):
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)
    return buf.getvalue()


def save_checkpoint(path, arrays, manifest=None):
    """Write ``<path>.npz`` (the arrays) then ``<path>.json`` (the manifest), each atomically.

    arrays: dict name -> array-like (numeric, bool or string dtypes; object arrays refused).
    manifest: dict of JSON-able data (config, vocab, state, ...); reserved keys
    ``schema, schema_version, rlhf_ref_version, npz, sha256, arrays`` are filled in here.
    Everything is checked before the first byte is written. Returns the manifest written.
    """
    npz_path, json_path = checkpoint_paths(path)
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of name -> array, got {type(arrays).__name__}")
    if manifest is None:
        manifest = {}
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    clash = sorted(set(manifest) & set(_RESERVED))
    if clash:
        raise ValueError(f"manifest keys {clash} are reserved (save_checkpoint fills in {list(_RESERVED)})")
    arrs = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"array names must be non-empty strings without NUL, got {name!r}")
        if isinstance(a, np.ndarray):
            arr = a
        else:
            try:
                arr = np.asarray(a)
            except Exception as e:           # ragged lists and the like
                raise ValueError(f"arrays[{name!r}] cannot be made an array: {e}") from None
        if arr.dtype.hasobject:
            raise CheckpointError(f"cannot save checkpoint {npz_path!r}: arrays[{name!r}] has dtype {arr.dtype} "
                                  f"(Python objects), which would need pickle; convert it to a numeric, "
                                  f"bool or string array")
        if arr.dtype.kind == "V":
            raise CheckpointError(f"cannot save checkpoint {npz_path!r}: arrays[{name!r}] has structured dtype "
                                  f"{arr.dtype}; store its fields as separate arrays")
        arrs[name] = arr
    user = to_jsonable(manifest, "manifest")
    meta = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "rlhf_ref_version": _version(),
        "npz": os.path.basename(npz_path),
        "sha256": None,
        "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in arrs.items()},
        **user,
    }
    json.dumps(meta, allow_nan=False)           # fail before writing if something slipped through
    data = _npz_bytes(arrs)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(meta, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(npz_path, data)
    atomic_write_text(json_path, text)
    return meta


def _version():
    try:
        from . import __version__
        return __version__
    except Exception:                # pragma: no cover - partial installs
        return "unknown"


def _read_checkpoint_file(path, what):
    """The bytes of one checkpoint file through ``safe_read`` (regular file, within the limits).
    A missing file is a CheckpointError (a resume may skip it); a file refused for what it is (a
    symlink, a FIFO, a folder, too large) stays a plain FileReadError, which a resume does not skip."""
    if not os.path.lexists(path):
        raise CheckpointError(path, f"checkpoint {what} not found")
    return safe_read.read_bytes(path, what=f"checkpoint {what}")


def _array_specs(specs, json_path):
    """The manifest's ``arrays`` table as {name: (shape list, dtype str)}, every entry checked."""
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise CheckpointError(json_path, f"arrays[{name!r:.80}] must be an object with 'shape' and 'dtype'")
        shape, dtype = spec.get("shape"), spec.get("dtype")
        if not isinstance(shape, list) or len(shape) > 32 or \
                any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2 ** 62 for n in shape):
            raise CheckpointError(json_path, f"arrays[{name!r:.80}] has shape {shape!r:.80}; expected a list of at "
                                             f"most 32 non-negative integers")
        if not isinstance(dtype, str) or not 0 < len(dtype) <= 32:
            raise CheckpointError(json_path, f"arrays[{name!r:.80}] has dtype {dtype!r:.80}; expected a NumPy "
                                             f"dtype string such as '<f4'")
        out[name] = (shape, dtype)
    return out


def load_checkpoint(path, *, schema=SCHEMA):
    """Read a checkpoint written by ``save_checkpoint``: ``(arrays dict, manifest dict)``.

    Every file is read through ``rlhf_ref.safe_read``: regular files only (no symlink, FIFO,
    device or folder), within ``safe_read.limits()``; the npz named by the manifest's ``"npz"``
    entry must be a plain name inside the manifest's folder; every array's ``.npy`` header is
    checked against the manifest's table before any array data is read. Never unpickles.

    Raises ``CheckpointError`` (a ``safe_read.FileReadError``, a ``ValueError``; message
    ``<file>: <what>``) for a missing or damaged checkpoint: a missing or unreadable manifest,
    another schema or schema version, a missing npz, a sha256 mismatch, a truncated or corrupt
    npz, an object (pickled) array, names/shapes/dtypes that differ from the manifest. A file
    refused for what it is (symlink, FIFO, over a size limit) raises ``FileReadError``.
    """
    npz_path, json_path = checkpoint_paths(path)
    # --- the manifest
    if not os.path.lexists(json_path):
        hint = " (the .npz exists: the save was probably interrupted before its manifest was written)" \
            if os.path.lexists(npz_path) else ""
        raise CheckpointError(json_path, f"checkpoint manifest not found{hint}")
    raw = safe_read.read_bytes(json_path, what="checkpoint manifest")
    try:
        meta = safe_read.loads_json(raw, json_path, what="checkpoint manifest",
                                    object_pairs_hook=safe_read.no_duplicate_keys)
    except FileReadError as e:
        raise CheckpointError(json_path, e.what) from None
    if not isinstance(meta, dict):
        raise CheckpointError(json_path, f"checkpoint manifest must hold a JSON object, got {type(meta).__name__}")
    if meta.get("schema") != schema:
        raise CheckpointError(json_path, f"checkpoint manifest has schema {meta.get('schema')!r:.80}; "
                                         f"expected {schema!r}")
    ver = meta.get("schema_version")
    if isinstance(ver, bool) or not isinstance(ver, int):
        raise CheckpointError(json_path, f"checkpoint manifest has schema_version {ver!r:.80}; expected an "
                                         f"integer (supported: {SCHEMA_VERSION})")
    if ver != SCHEMA_VERSION:
        raise CheckpointError(json_path, f"checkpoint manifest has schema_version {ver}, but this rlhf_ref "
                                         f"({_version()}) supports schema_version {SCHEMA_VERSION} only")
    specs = meta.get("arrays")
    digest = meta.get("sha256")
    if not isinstance(specs, dict) or not isinstance(digest, str):
        raise CheckpointError(json_path, "checkpoint manifest lacks its 'arrays' table or 'sha256' digest")
    expected = _array_specs(specs, json_path)
    # --- the npz next to the manifest, and the hash of its bytes. The manifest's "npz" entry must be
    # a plain file name (no folder, no '..', not absolute); the arrays read are always <stem>.npz in
    # the manifest's folder (a checkpoint copied under another name keeps working), read through
    # safe_read (a regular file: a symlink to another checkpoint or out of the folder is refused).
    name = meta.get("npz")
    if not isinstance(name, str) or not name or "\x00" in name or "/" in name or "\\" in name \
            or name in (".", "..") or (len(name) >= 2 and name[1] == ":"):
        raise CheckpointError(json_path, f"'npz' entry {name!r:.80} must be the plain file name of the "
                                         f"checkpoint's arrays, in the manifest's folder")
    data = _read_checkpoint_file(npz_path, "arrays")
    found = hashlib.sha256(data).hexdigest()
    if found != digest:
        raise CheckpointError(npz_path, f"checkpoint arrays do not match manifest {json_path}: sha256 "
                                        f"{found[:16]}… found, {digest[:16]:.16}… expected (the file was changed, "
                                        f"truncated, or the save was interrupted between the two files)")
    # --- parse without pickle, every header checked against the manifest before any data is read
    try:
        arrays = safe_read.load_npz(data, npz_path, what="checkpoint", expected=expected)
    except FileReadError as e:
        raise CheckpointError(npz_path, e.what) from None
    return arrays, meta
