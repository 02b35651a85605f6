"""Large arguments go to each worker once, not once per task.

A numpy array handed to every ``submit``, or bound into the function given to
``map`` with ``functools.partial``, would otherwise travel inside every
batch. Instead a batch is pickled with protocol 5, which hands every large
contiguous buffer (a numpy array's data, including those inside pandas
objects, or a ``bytearray``, of at least ``SHARE_THRESHOLD`` bytes) to a
callback rather than copying it into the pickle. The buffer is scattered to
the cluster once, under a key derived from its content, and given to the
batch's task as a Dask dependency, so each worker fetches it once and keeps
it while it is in use. ``bytes`` objects are not out-of-band buffers in
pickle, so they stay in the payload; a payload that is still large (large
``bytes``, or many small objects) is shared the same way as a whole rather
than embedded in the task graph, which measured 4x slower for 8 MB and makes
Dask warn about large graphs.

Why a buffer callback and not a pickler hook that looks at every object: the
hook is a Python call per object, which made pickling a chunk of 20,000 small
items 15x slower; the callback runs only for buffers.

Each call gets its own writable copy of a shared buffer (a memory copy costs
well under a millisecond per 8 MB), so a call that changes its argument in
place changes nothing for the others, as with ``ProcessPoolExecutor``.

On a local cluster, whose workers share this machine's memory, a shared
buffer goes through a file in a private directory in ``/dev/shm`` instead of
through Dask: the client writes it once and each call reads its copy
straight from memory, as joblib does with its memory-mapped arrays. Dask's
comms encrypt every byte with TLS, which made 20 x 8 MB arrays 2.3x slower
than the same transfer in the clear; a file readable only by this user needs
no encryption. The workers remove the directory if the
client dies without doing so.

Content, not identity, names a buffer: an array changed in place between two
submits is sent again, as ``ProcessPoolExecutor`` would pickle it again. A
buffer stays on the cluster while batches that use it are in flight, and is
released a moment (``IDLE_RELEASE`` seconds) after the last of them, so a
buffer reused by batches sent one after another is not sent again, and the
cluster holds no inputs once the work is done.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import shutil
import tempfile
import threading
import time
from typing import Any

import cloudpickle

#: Buffers at least this large are shared rather than pickled into batches.
SHARE_THRESHOLD = 1_000_000
#: Seconds an unused shared buffer stays on the cluster in case it is reused.
IDLE_RELEASE = 1.0


@dataclasses.dataclass(frozen=True)
class SharedFile:
    """A shared buffer that a worker on this machine reads from a file."""

    path: str
    nbytes: int

    def read(self) -> bytearray:
        buffer = bytearray(self.nbytes)
        view = memoryview(buffer)
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < self.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise EOFError(f"shared buffer {self.path} ended after {done} of {self.nbytes} bytes")
                done += got
        return buffer


def _write_file(path: str, data: memoryview) -> SharedFile:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            done = 0
            while done < data.nbytes:
                done += f.write(data[done:]) or 0
    except BaseException:
        _unlink(path)
        raise
    return SharedFile(path, data.nbytes)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedDirectory:
    """A private directory (mode 0700) in memory-backed ``/dev/shm`` where
    there is one, for the buffers shared with workers on this machine."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.path = tempfile.mkdtemp(prefix="sulis-executor-", dir=base)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class SharedBuffers:
    """The buffers this executor has put on the cluster, by content, with the
    number of batches in flight that use each. Used from one thread (the
    engine's sender) and the collector, so it locks.

    ``direct`` scatters straight to the workers instead of through the
    scheduler (3x faster for 8 MB), for clusters whose workers this process
    can reach, which is so when the executor started them. ``directory``,
    for workers on this machine only, is where buffers go as files instead.
    """

    def __init__(self, client: Any, direct: bool = False, directory: str | None = None) -> None:
        self._client = client
        self._direct = direct
        self._directory = directory
        self._lock = threading.Lock()
        # Per key: a SharedFile, or the Dask future of a scattered buffer.
        self._handles: dict[str, Any] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._idle_since: dict[str, float] = {}

    def dumps(self, parts: list[Any]) -> tuple[Any, list[str], list[Any]]:
        """Pickle the ``parts`` of a batch about to be sent (its calls, or
        one map chunk); return the payload (``bytes``, or the handle of a
        shared one when it is large), the distinct shared keys the batch
        refers to, and the handles of its out-of-band buffers in pickling
        order (Dask futures or files, to pass to the task). Call :meth:`done`
        with the keys when the batch is settled.

        Each part is pickled on its own, as ``ProcessPoolExecutor`` pickles
        each call: an object given to two calls in one batch must arrive as
        two objects, or one call would see what the other did to it.
        """
        large: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: let pickle copy it in band
                return True
            if raw.nbytes < SHARE_THRESHOLD:
                return True
            large.append(raw)
            return False

        file = io.BytesIO()
        pickler = cloudpickle.Pickler(file, protocol=5, buffer_callback=out_of_band)
        pickled, counts = [], []
        for part in parts:
            before = len(large)
            file.seek(0)
            file.truncate()
            pickler.clear_memo()
            pickler.dump(part)
            pickled.append(file.getvalue())
            counts.append(len(large) - before)
        payload = pickle.dumps((pickled, counts), protocol=5)
        large_payload = len(payload) >= SHARE_THRESHOLD
        if not large and not large_payload:
            return payload, [], []
        from dask.hashing import hash_buffer_hex

        if large_payload:
            large.insert(0, memoryview(payload))
        order = [f"sulis-shared-{raw.nbytes}-{hash_buffer_hex(raw)}" for raw in large]
        keys = list(dict.fromkeys(order))
        with self._lock:
            missing = {k: raw for k, raw in zip(order, large) if k not in self._handles}
        if missing:
            stored = self._store(missing)
            with self._lock:
                for key, handle in stored.items():
                    if self._handles.setdefault(key, handle) is not handle:
                        self._drop([handle])  # another thread stored it first
        with self._lock:
            self._users.update(keys)
            for key in keys:
                self._idle_since.pop(key, None)
            handles = [self._handles[k] for k in order]
        if large_payload:
            return handles[0], keys, handles[1:]
        return payload, keys, handles

    def _store(self, buffers: dict[str, memoryview]) -> dict[str, Any]:
        """Put buffers where the workers can get them: files if we can (a
        full /dev/shm falls back to Dask), else scattered through Dask."""
        stored: dict[str, Any] = {}
        if self._directory is not None:
            for key, raw in buffers.items():
                try:
                    stored[key] = _write_file(os.path.join(self._directory, key), raw)
                except FileExistsError:
                    stored[key] = SharedFile(os.path.join(self._directory, key), raw.nbytes)
                except OSError:
                    break
        rest = {k: raw for k, raw in buffers.items() if k not in stored}
        if rest:
            stored.update(self._client.scatter(rest, hash=False, direct=self._direct))
        return stored

    @staticmethod
    def _drop(handles: list[Any]) -> None:
        for handle in handles:
            if isinstance(handle, SharedFile):
                _unlink(handle.path)
            else:
                handle.release()

    def done(self, keys: list[str]) -> None:
        """A batch using ``keys`` is settled: buffers nobody uses become idle."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._users[key] -= 1
                if self._users[key] <= 0:
                    del self._users[key]
                    self._idle_since[key] = now

    def release_idle(self) -> None:
        """Release buffers unused for ``IDLE_RELEASE`` seconds."""
        if not self._idle_since:
            return
        cutoff = time.monotonic() - IDLE_RELEASE
        with self._lock:
            expired = [k for k, since in self._idle_since.items() if since <= cutoff]
            handles = [self._handles.pop(k) for k in expired]
            for key in expired:
                del self._idle_since[key]
        self._drop(handles)

    def release(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._users.clear()
            self._idle_since.clear()
        self._drop(handles)


class Unreadable:
    """Stands, in what :func:`loads` returns, for a part that could not be
    unpickled: ``error`` is what unpickling it raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def loads(payload: Any, shared: tuple[Any, ...]) -> list[Any]:
    """Unpickle a batch's parts on a worker. ``payload`` is the pickle, or
    the file it was shared through; ``shared`` are its out-of-band buffers
    in order; each part gets its own copy of those it uses, so a call owns
    (and may change) its arguments.

    A part that cannot be unpickled is returned as an :class:`Unreadable`,
    whatever it raised (even ``SystemExit``, from a ``__reduce__``: this runs
    in a worker's task thread, which signals never reach), so that only its
    call fails. Errors reading the payload itself propagate."""
    if isinstance(payload, SharedFile):
        payload = payload.read()
    pickled, counts = pickle.loads(payload)
    parts: list[Any] = []
    position = 0
    for part, count in zip(pickled, counts):
        used = shared[position:position + count]
        position += count
        try:
            buffers = [b.read() if isinstance(b, SharedFile) else bytearray(b) for b in used]
            parts.append(pickle.loads(part, buffers=buffers))
        except BaseException as error:
            parts.append(Unreadable(error))
    return parts
