"""The resume journal: a log of finished calls, so a rerun skips them.

File format (our own, not SQLite, whose locking NFS and Lustre break):

* a 16-byte header, ``MAGIC``, which says the file is a journal and its version;
* then records, each ``length`` (8 bytes, big-endian), ``crc32`` (4 bytes, of
  the length and the payload) and ``payload``: the 32-byte key, then the
  result's pickle.

Only the client process writes, appending; a record is valid only when it
is whole and its checksum matches, so a record torn by a kill or a full disk
ends the journal there: the records before it still read, and the next writer
truncates the torn tail before it appends. No file locks are taken.

A key is ``sha256(function identity) + sha256(arguments' pickle)`` folded into
one digest (see :func:`function_digest` and :func:`call_key`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import pickle
import struct
import sys
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger("sulis_executor")

MAGIC = b"SULIS-JOURNAL\x00\x01\n"  # 16 bytes: name, format version 1
assert len(MAGIC) == 16
_HEAD = struct.Struct(">QI")  # payload length, crc32
KEY_BYTES = 32
#: Records buffered before they are written; a timer writes them after FLUSH_SECONDS anyway.
FLUSH_RECORDS = 256
FLUSH_SECONDS = 1.0


class NotAJournalError(ValueError):
    """The file exists and is not a journal (its header is not ours)."""


# -- keys -------------------------------------------------------------------

_SIMPLE = (int, float, complex, str, bytes, bool, type(None))


def _const_repr(value: Any, seen: set[int], out: Callable[[bytes], None]) -> None:
    if isinstance(value, types.CodeType):
        _hash_code(value, seen, out)
    elif isinstance(value, tuple):
        out(b"(")
        for item in value:
            _const_repr(item, seen, out)
        out(b")")
    elif isinstance(value, frozenset):
        # Its order depends on string hashing, which differs between processes.
        out(b"{" + b",".join(sorted(repr(item).encode() for item in value)) + b"}")
    else:
        out(type(value).__name__.encode() + b":" + repr(value).encode() + b";")


def _hash_code(code: types.CodeType, seen: set[int], out: Callable[[bytes], None]) -> None:
    # Not marshal: its output depends on reference counts. Line numbers and
    # the file name are left out, so moving a function keeps its entries.
    out(b"code:" + code.co_code)
    out(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
              code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    for const in code.co_consts:
        _const_repr(const, seen, out)


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _pickled(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]


def _hash_callable(fn: Any, seen: set[int], out: Callable[[bytes], None]) -> None:
    if id(fn) in seen:
        out(b"<seen>")
        return
    seen.add(id(fn))
    if isinstance(fn, types.MethodType):
        out(b"method:")
        _hash_callable(fn.__func__, seen, out)
        out(_pickled(fn.__self__))
        return
    if hasattr(fn, "func") and hasattr(fn, "args") and hasattr(fn, "keywords"):  # partial
        out(b"partial:")
        _hash_callable(fn.func, seen, out)
        out(_pickled((fn.args, fn.keywords)))
        return
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', None)}"
    if not isinstance(code, types.CodeType):
        # A builtin, a class, or a callable object: its name, and its state.
        out(b"object:" + name.encode())
        if not isinstance(fn, (types.BuiltinFunctionType, type)):
            out(b"type:" + f"{type(fn).__module__}.{type(fn).__qualname__}".encode())
            out(_pickled(fn))
        return
    out(b"function:" + name.encode())
    _hash_code(code, seen, out)
    out(_pickled((getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None))))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            out(b"<empty>")
            continue
        if callable(content) and hasattr(content, "__code__"):
            _hash_callable(content, seen, out)
        else:
            out(_pickled(content))
    # What it uses from its module: constants, and functions defined there.
    namespace = getattr(fn, "__globals__", {})
    for global_name in sorted(set(_global_names(code))):
        value = namespace.get(global_name)
        if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
            out(b"global:" + global_name.encode())
            _hash_callable(value, seen, out)
        elif isinstance(value, _SIMPLE) or (
            isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)
        ):
            out(b"global:" + global_name.encode() + repr(value).encode())


def function_digest(fn: Callable[..., Any]) -> bytes:
    """A digest of ``fn``'s identity and code: its qualified name, bytecode,
    constants, defaults, closure, and the module constants and same-module
    functions it uses. Same in every process running the same code; the
    Python version is part of it, since bytecode differs between versions."""
    digest = hashlib.sha256(b"sulis-fn-1:" + f"{sys.version_info[:2]}".encode())
    _hash_callable(fn, set(), digest.update)
    return digest.digest()


def call_key(fn_digest: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes | None:
    """The journal key of one call, or ``None`` if its arguments cannot be pickled."""
    try:
        payload = _pickled((args, kwargs))
    except Exception:
        return None
    return hashlib.sha256(fn_digest + payload).digest()


# -- the file -----------------------------------------------------------------


def _scan(path: str) -> tuple[dict[bytes, tuple[int, int]], int, int]:
    """Read ``path``: ``(index, valid_end, size)``, the index mapping each key
    to its result's ``(offset, length)``. Raises ``NotAJournalError``."""
    index: dict[bytes, tuple[int, int]] = {}
    with open(path, "rb") as handle:
        header = handle.read(len(MAGIC))
        size = os.fstat(handle.fileno()).st_size
        if header != MAGIC:
            if size == 0:
                return index, 0, 0  # an empty file becomes a journal
            if MAGIC[:13] == header[:13]:
                raise NotAJournalError(f"{path} is a journal of another format version "
                                       f"({header[13:15]!r}); clear it or choose another path")
            raise NotAJournalError(f"{path} is not a sulis_executor journal (its first bytes "
                                   f"are {header[:16]!r}); choose another path for journal=")
        offset = len(MAGIC)
        while offset + _HEAD.size <= size:
            head = handle.read(_HEAD.size)
            length, crc = _HEAD.unpack(head)
            if length < KEY_BYTES or offset + _HEAD.size + length > size:
                break
            payload = handle.read(length)
            if len(payload) != length or zlib.crc32(head[:8] + payload) != crc:
                break
            index[payload[:KEY_BYTES]] = (offset + _HEAD.size + KEY_BYTES, length - KEY_BYTES)
            offset += _HEAD.size + length
        return index, offset, size


def encode_record(key: bytes, value: bytes) -> bytes:
    payload = key + value
    length = struct.pack(">Q", len(payload))
    return length + struct.pack(">I", zlib.crc32(length + payload)) + payload


def inspect(path: str) -> tuple[int, int, int]:
    """``(calls, size in bytes, bytes of a torn tail)`` of the journal at ``path``."""
    index, end, size = _scan(path)
    return len(index), size, size - end if size else 0


def clear(path: str) -> None:
    """Empty the journal at ``path`` (refusing a file that is not one)."""
    _scan(path)
    with open(path, "wb") as handle:
        handle.write(MAGIC)


_open_journals: dict[str, Journal] = {}
_open_journals_lock = threading.Lock()


def open_journal(path: str) -> Journal:
    """The journal at ``path``, shared by the executors of this process
    (one writer per file: a second executor on it must not append apart)."""
    key = os.path.abspath(path)
    with _open_journals_lock:
        journal = _open_journals.get(key)
        if journal is None or journal.closed:
            journal = _open_journals[key] = Journal(key)
        return journal


class Journal:
    """One client's journal: what earlier runs recorded, and what this one
    adds, buffered and appended in batches (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._timer: threading.Timer | None = None
        self._closed = False
        if os.path.exists(self.path):
            self._index, end, size = _scan(self.path)
        else:
            self._index, end, size = {}, 0, 0
        # One writer: open for update, and cut a torn tail off before appending.
        self._file = open(self.path, "r+b" if os.path.exists(self.path) else "w+b")  # noqa: SIM115
        if end == 0:
            self._file.truncate(0)
            self._file.write(MAGIC)
            self._file.flush()
            end = len(MAGIC)
        elif size > end:
            logger.warning("journal %s: ignoring a torn last record (%d bytes)", self.path,
                           size - end)
            self._file.truncate(end)
        self._file.seek(end)
        self._end = end
        self.recorded = len(self._index)
        atexit.register(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, key: bytes | None) -> tuple[bool, Any]:
        """``(True, result)`` if ``key`` is recorded, else ``(False, None)``."""
        if key is None:
            return False, None
        with self._lock:
            where = self._index.get(key)
            if where is None:
                return False, None
            offset, length = where
            if offset >= self._end:  # still in the buffer
                self._flush_locked()
            data = os.pread(self._file.fileno(), length, offset)
        try:
            return True, pickle.loads(data)
        except Exception:
            logger.warning("journal %s: a recorded result could not be unpickled; running "
                           "the call again", self.path, exc_info=True)
            return False, None

    def record(self, key: bytes | None, result: Any) -> None:
        """Record a finished call's result (one that cannot be pickled is not)."""
        if key is None or self._closed:
            return
        try:
            value = _pickled(result)
        except Exception:
            logger.debug("journal: result of a call not recorded (cannot pickle it)",
                         exc_info=True)
            return
        record = encode_record(key, value)
        with self._lock:
            if self._closed or key in self._index:
                return
            start = self._end + sum(len(r) for r in self._buffer)
            self._index[key] = (start + _HEAD.size + KEY_BYTES, len(value))
            self._buffer.append(record)
            if len(self._buffer) >= FLUSH_RECORDS:
                self._flush_locked()
            elif self._timer is None:
                self._timer = threading.Timer(FLUSH_SECONDS, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush_locked(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._end += len(data)

    def flush(self) -> None:
        """Write what is buffered, now."""
        with self._lock:
            self._timer = None
            if not self._closed:
                self._flush_locked()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:
                self._flush_locked()
            finally:
                self._closed = True
                self._file.close()
        atexit.unregister(self.close)
