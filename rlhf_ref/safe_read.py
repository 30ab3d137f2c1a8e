"""Reading files users name: regular files only, inside their folder, within size limits.

Every file rlhf_ref reads on a user's behalf (checkpoints, preference JSON Lines, labeler
candidates, golden-vector folders, verifier outputs) goes through this module, so that a hostile
or broken file gives one kind of error and never a crash, a hang or a read of something else:

    resolve_inside(folder, name)      a name taken from a file (a manifest) → a path inside ``folder``:
                                      relative, no ``..``, no absolute path, no symlink on the way
    read_bytes(path)                  the whole file, refusing symlinks, FIFOs, devices, folders and
                                      anything over ``limits().max_file_bytes`` (checked before reading,
                                      and again while reading, for a file that grows)
    read_text(path)                   the same, decoded as strict UTF-8
    loads_json(text, path, line)      json.loads without NaN/Infinity, with the nesting depth bounded
    load_npz(data, path)              a NumPy zip archive: every member's header read first; object
                                      dtypes, sizes over ``limits().max_array_bytes`` (declared, not
                                      decompressed) and members that are not ``.npy`` are refused
                                      before any array is read

Every failure is a ``FileReadError`` (a ``ValueError``) whose message starts with the file name,
and the line when there is one: ``<file>[:<line>]: <what is wrong>``. The CLI prints it as
``rlhf-ref <cmd>: error: <message>`` and exits with 2.

The limits are generous defaults for this project's files; ``set_limits`` (the CLI's
``--max-file-mb``) raises them, and ``limits_override`` does so for one block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import json
import os
import re
import stat
import zipfile

import numpy as np

__all__ = ["FileReadError", "Limits", "limits", "set_limits", "limits_override", "resolve_inside",
           "read_bytes", "read_text", "loads_json", "no_duplicate_keys", "load_npz"]


class FileReadError(ValueError):
    """A file rlhf_ref refuses to read or cannot parse. ``str(e)`` is ``<file>[:<line>]: <what>``."""

    def __init__(self, path, what, line=None):
        self.path = os.fspath(path) if path is not None else "<input>"
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {what}")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 2 << 30       #: any one file read (2 GiB)
    max_array_bytes: int = 4 << 30      #: the declared, decompressed size of all arrays of one .npz (4 GiB)
    max_members: int = 10_000           #: members of one .npz
    max_json_depth: int = 64            #: nesting of one JSON document (a manifest, a JSONL line)


_LIMITS = Limits()


def limits():
    """The limits in force."""
    return _LIMITS


def set_limits(**kw):
    """Change the limits in force (keyword names of ``Limits``); returns the previous ``Limits``."""
    global _LIMITS
    old = _LIMITS
    for k, v in kw.items():
        if k not in Limits.__dataclass_fields__:
            raise TypeError(f"unknown limit {k!r}; expected one of {sorted(Limits.__dataclass_fields__)}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"limit {k} must be a positive integer, got {v!r}")
    _LIMITS = dataclasses.replace(old, **{k: int(v) for k, v in kw.items()})
    return old


@contextlib.contextmanager
def limits_override(**kw):
    """``with limits_override(max_file_bytes=...):`` — the limits changed for one block."""
    old = set_limits(**kw)
    try:
        yield _LIMITS
    finally:
        set_limits(**dataclasses.asdict(old))


def set_max_file_mb(mb):
    """``--max-file-mb MB`` of the commands that read files: files up to MB MiB, and up to 2·MB MiB of
    declared array data in one .npz. None keeps the limits in force."""
    if mb is None:
        return
    if isinstance(mb, bool) or not isinstance(mb, (int, float, np.integer, np.floating)) \
            or not (0 < mb <= 1 << 30):
        raise ValueError(f"--max-file-mb: must be a positive number of MiB (at most {1 << 30}), got {mb!r}")
    n = max(1, int(mb * (1 << 20)))
    set_limits(max_file_bytes=n, max_array_bytes=2 * n)


def _size(n):
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# ----------------------------------------------------------------------------- paths
def _lstat(path, what):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise FileReadError(path, f"{what} not found") from None
    except OSError as e:
        raise FileReadError(path, f"cannot read {what}: {e.strerror or e}") from None


def resolve_inside(folder, name, *, what="file"):
    """The path of ``name`` (a string read from a manifest) inside ``folder``.

    ``name`` must be a non-empty relative path without ``..`` components, and no component of
    the result may be a symlink (a link that points inside the folder today may point elsewhere
    tomorrow). Raises FileReadError naming ``folder`` for anything else.
    """
    folder = os.fspath(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FileReadError(folder, f"{what} name must be a non-empty string, got {name!r:.80}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) \
            or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise FileReadError(folder, f"{what} name {name!r:.80} must be a plain relative path inside the folder "
                                    f"(no absolute path, no '..', no empty or '.' parts)")
    path = folder
    for p in parts:
        path = os.path.join(path, p)
        st = _lstat(path, what)
        if stat.S_ISLNK(st.st_mode):
            raise FileReadError(path, f"{what} is a symbolic link; rlhf_ref reads only regular files inside "
                                      f"the folder it was given")
    return path


# ----------------------------------------------------------------------------- bytes and text
def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path, *, what="file", max_bytes=None):
    """The bytes of the regular file ``path`` (not a symlink, FIFO, device or folder), at most
    ``max_bytes`` (default ``limits().max_file_bytes``). Raises FileReadError naming ``path``."""
    path = os.fspath(path)
    limit = _LIMITS.max_file_bytes if max_bytes is None else int(max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    st = _lstat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise FileReadError(path, f"{what} is {_kind(st.st_mode)}; expected a regular file")
    try:
        fd = os.open(path, flags)       # O_NONBLOCK: a FIFO swapped in after lstat cannot block us
    except OSError as e:
        raise FileReadError(path, f"cannot open {what}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError(path, f"{what} is {_kind(st.st_mode)}; expected a regular file")
        if st.st_size > limit:
            raise FileReadError(path, f"{what} is {_size(st.st_size)}, over the limit of {_size(limit)} "
                                      f"(raise it with --max-file-mb)")
        chunks, n = [], 0
        while True:
            b = f.read(min(1 << 20, limit + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
            if n > limit:
                raise FileReadError(path, f"{what} grew past the limit of {_size(limit)} while being read")
    return b"".join(chunks)


def read_text(path, *, what="file", max_bytes=None):
    """``read_bytes`` decoded as strict UTF-8 (errors name the byte offset)."""
    data = read_bytes(path, what=what, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FileReadError(path, f"{what} is not valid UTF-8 (byte {e.start})", line=line) from None


# ----------------------------------------------------------------------------- JSON
def _no_constant(c):
    raise ValueError(f"{c} is not valid JSON (a non-standard constant)")


def _depth(obj, limit):
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj):
    """The first string (key or value) of ``obj`` that holds a lone surrogate, or None."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return o
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


def no_duplicate_keys(pairs):
    """An ``object_pairs_hook`` that refuses a key given twice in one object."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r:.80}")
        d[k] = v
    return d


def loads_json(text, path=None, line=None, *, what="document", object_pairs_hook=None):
    """``json.loads`` for files users give: NaN/Infinity refused, nesting bounded by
    ``limits().max_json_depth``, strings with a lone surrogate (``"\\ud800"``: not Unicode text,
    cannot be written back as UTF-8) refused; every failure a FileReadError naming ``path`` and
    ``line``."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileReadError(path, f"{what} is not valid UTF-8 (byte {e.start})", line=line) from None
    limit = _LIMITS.max_json_depth
    # Cheap pre-check: a document cannot nest deeper than its count of opening brackets.
    if text.count("[") + text.count("{") > limit:
        depth = 0
        in_str = esc = False
        for ch in text:
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "[{":
                depth += 1
                if depth > limit:
                    raise FileReadError(path, f"{what} nests deeper than {limit} levels", line=line)
            elif ch in "]}":
                depth -= 1
    try:
        obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise FileReadError(path, f"{what} nests too deeply", line=line) from None
    except ValueError as e:          # JSONDecodeError, our constants, huge integers (int max str digits)
        raise FileReadError(path, f"{what} is not valid JSON: {e}", line=line) from None
    if not _depth(obj, limit):       # pragma: no cover - the pre-check already caught it
        raise FileReadError(path, f"{what} nests deeper than {limit} levels", line=line)
    if _SURROGATE_ESCAPE.search(text):
        bad = _lone_surrogate(obj)
        if bad is not None:
            raise FileReadError(path, f"{what} holds a string with a lone surrogate ({ascii(bad):.60}): "
                                      f"not Unicode text", line=line)
    return obj


# ----------------------------------------------------------------------------- .npz
def load_npz(data, path=None, *, what="archive", expected=None):
    """The arrays of a NumPy ``.npz`` (bytes, as ``read_bytes`` returns), without pickle.

    Each member's ``.npy`` header is read first; the archive is refused before any array data is
    read when a member is not ``<name>.npy``, has an object or structured dtype, or when the
    declared sizes add up to more than ``limits().max_array_bytes``. ``expected`` (optional) maps
    name → (shape, dtype string) as a manifest declares them; a mismatch is refused then too.
    Returns {name: array}.
    """
    lim = _LIMITS
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise FileReadError(path, f"{what} is not a NumPy .npz (zip) archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > lim.max_members:
            raise FileReadError(path, f"{what} has {len(infos)} members, over the limit of {lim.max_members}")
        headers, total = {}, 0
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise FileReadError(path, f"{what} member {info.filename!r:.80} is not a .npy array")
            name = info.filename[:-4]
            if name in headers:
                raise FileReadError(path, f"{what} holds array {name!r:.80} twice")
            try:
                with zf.open(info) as m:
                    version = np.lib.format.read_magic(m)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
            except (ValueError, zipfile.BadZipFile, EOFError, OSError, NotImplementedError, KeyError,
                    RuntimeError) as e:
                raise FileReadError(path, f"{what} member {info.filename!r:.80} has a bad .npy header: {e}") from None
            if dtype.hasobject or dtype.kind == "V":
                raise FileReadError(path, f"{what} array {name!r:.80} has dtype {dtype} (Python objects or a "
                                          f"structured record); rlhf_ref never loads pickles")
            n = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
            total += n
            if total > lim.max_array_bytes:
                raise FileReadError(path, f"{what} declares {_size(total)} of arrays or more, over the limit "
                                          f"of {_size(lim.max_array_bytes)} (raise it with --max-file-mb)")
            if info.file_size < n:
                raise FileReadError(path, f"{what} array {name!r:.80} declares shape {list(shape)} {dtype.str} "
                                          f"({n} bytes) but its member holds only {info.file_size} bytes")
            if expected is not None:
                if name not in expected:
                    raise FileReadError(path, f"{what} holds array {name!r:.80} that its manifest does not list")
                eshape, edtype = expected[name]
                if list(shape) != list(eshape) or dtype.str != edtype:
                    raise FileReadError(path, f"{what} array {name!r:.80} has shape {list(shape)} dtype "
                                              f"{dtype.str}; the manifest says shape {list(eshape)} dtype {edtype}")
            headers[name] = info
        if expected is not None and set(expected) - set(headers):
            raise FileReadError(path, f"{what} lacks arrays {sorted(set(expected) - set(headers))} that its "
                                      f"manifest lists")
        arrays = {}
        for name, info in headers.items():
            try:
                with zf.open(info) as m:
                    arrays[name] = np.lib.format.read_array(m, allow_pickle=False)
            except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
                raise FileReadError(path, f"{what} array {name!r:.80} is truncated or corrupt: {e}") from None
    return arrays
