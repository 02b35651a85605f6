"""Large arguments go to each worker once, not once per task.

A numpy array handed to every ``submit``, or bound into the function given to
``map`` with ``functools.partial``, would otherwise travel inside every
batch. Instead a batch is pickled with protocol 5, which hands every large
contiguous buffer (a numpy array's data, including those inside pandas
objects, or a ``pickle.PickleBuffer``, of at least ``SHARE_THRESHOLD`` bytes)
to a callback rather than copying it into the pickle. The buffer is scattered to
the cluster once, under a key derived from its content, and given to the
batch's task as a Dask dependency, so each worker fetches it once and keeps
it while it is in use. ``bytes`` and ``bytearray`` objects are not
out-of-band buffers in pickle, so they stay in the payload; a payload that is still large (large
``bytes``, or many small objects) is shared the same way as a whole rather
than embedded in the task graph, which measured 4x slower for 8 MB and makes
Dask warn about large graphs.

What a batch is made of decides what may carry it. A runner (see
``_remote.run_pulled``) takes its batches inside stream messages and cannot
resolve Dask data, so a batch with a buffer scattered through Dask goes as
a Dask task, whatever else it holds. A batch that is large only as a whole
(many calls of a few kB each, grouped in one batch, or one large ``bytes``
argument) stays inline for a runner, since a message carries large bytes
well; files (below) suit both.

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
cluster holds no inputs once the work is done. Unused buffers are kept up
to ``IDLE_LIMIT`` bytes, the oldest going first beyond it, so steady work on
fresh buffers holds a bounded amount (in ``/dev/shm`` or the workers' memory).
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
#: Unused shared buffers kept for reuse, in bytes at most: beyond this the
#: oldest go at once, so that steady work with fresh buffers holds at most
#: this much besides what the batches in flight use.
IDLE_LIMIT = 256 * 1_000_000


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


def held_by_dask(handle: Any) -> bool:
    """Whether a payload or buffer handle is Dask data (the future of a
    scattered buffer), which reaches a worker only as a task's dependency;
    ``bytes`` and files reach it inside any message, a runner's included."""
    return not isinstance(handle, (bytes, SharedFile))


@dataclasses.dataclass(frozen=True)
class Pickled:
    """A batch pickled for the cluster (see :meth:`SharedBuffers.dumps`).

    ``payload`` is the pickle (``bytes``) or the handle it was shared
    through; ``handles`` are its out-of-band buffers' handles in pickling
    order; ``keys`` the distinct shared keys it uses, to give back to
    :meth:`SharedBuffers.done` once the batch is settled.
    """

    payload: Any
    handles: tuple[Any, ...] = ()
    keys: tuple[str, ...] = ()

    @property
    def needs_dask(self) -> bool:
        """Whether only a Dask task can carry it: some of it is Dask data."""
        return held_by_dask(self.payload) or any(held_by_dask(h) for h in self.handles)


class SharedBuffers:
    """The buffers this executor has put on the cluster, by content, with the
    number of batches in flight that use each. Used from the engine's
    sending threads and its collector, so it locks.

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
        # Per key: a SharedFile, or the Dask future of a scattered buffer;
        # its size; and how many batches in flight use it.
        self._handles: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._users: collections.Counter[str] = collections.Counter()
        # Keys no batch uses, oldest first, with when they became unused.
        self._idle_since: dict[str, float] = {}
        self._idle_bytes = 0

    def dumps(self, parts: list[Any], inline_whole: bool = False) -> Pickled:
        """Pickle the ``parts`` of a batch about to be sent (its calls, or
        one map chunk). Call :meth:`done` with its ``keys`` when the batch
        is settled.

        A payload that is large as a whole is shared, as a file when there
        is a shared directory, else through Dask, unless ``inline_whole``
        and nothing else in it is Dask data: a runner takes it inside its
        handout message, which unlike a task graph carries large bytes well,
        and a runner cannot resolve Dask data.

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
        large_whole = len(payload) >= SHARE_THRESHOLD
        if not large and not large_whole:
            return Pickled(payload)
        order = [_key_of(raw) for raw in large]
        handles = self._share(dict(zip(order, large)))
        keys = list(dict.fromkeys(order))
        buffers = tuple(handles[k] for k in order)
        if large_whole and (self._directory is not None or not inline_whole
                            or any(held_by_dask(h) for h in buffers)):
            whole = memoryview(payload)
            key = _key_of(whole)
            payload = self._share({key: whole})[key]
            keys.append(key)
        return Pickled(payload, buffers, tuple(dict.fromkeys(keys)))

    def _share(self, buffers: dict[str, memoryview]) -> dict[str, Any]:
        """Handles for these buffers, each now counted as used by one more
        batch: those already on the cluster (even idle ones, which are
        claimed before anything can release them), and the rest stored."""
        with self._lock:
            claimed = {key: self._claim_locked(key) for key in buffers if key in self._handles}
        missing = {key: raw for key, raw in buffers.items() if key not in claimed}
        if missing:
            stored = self._store(missing)
            duplicates = []
            with self._lock:
                for key, handle in stored.items():
                    if self._handles.setdefault(key, handle) is not handle:
                        duplicates.append(handle)  # another thread stored it first
                    self._sizes[key] = missing[key].nbytes
                    claimed[key] = self._claim_locked(key)
            self._drop(duplicates)
        return claimed

    def _claim_locked(self, key: str) -> Any:
        self._users[key] += 1
        if self._idle_since.pop(key, None) is not None:
            self._idle_bytes -= self._sizes[key]
        return self._handles[key]

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

    def done(self, keys: tuple[str, ...] | list[str]) -> None:
        """A batch using ``keys`` is settled: buffers nobody uses become
        idle, and the oldest idle ones go if they hold over ``IDLE_LIMIT``."""
        if not keys:
            return
        now = time.monotonic()
        with self._lock:
            for key in keys:
                if key not in self._handles:
                    continue  # released already: the executor is closing
                self._users[key] -= 1
                if self._users[key] <= 0:
                    del self._users[key]
                    self._idle_since[key] = now
                    self._idle_bytes += self._sizes[key]
            handles = self._release_locked(lambda: self._idle_bytes > IDLE_LIMIT)
        self._drop(handles)

    def release_idle(self) -> None:
        """Release buffers unused for ``IDLE_RELEASE`` seconds."""
        if not self._idle_since:
            return
        cutoff = time.monotonic() - IDLE_RELEASE
        with self._lock:
            handles = self._release_locked(
                lambda: next(iter(self._idle_since.values())) <= cutoff)
        self._drop(handles)

    def _release_locked(self, more: Any) -> list[Any]:
        """Forget idle buffers, oldest first, while ``more()``; return their handles."""
        handles = []
        while self._idle_since and more():
            key = next(iter(self._idle_since))
            del self._idle_since[key]
            self._idle_bytes -= self._sizes.pop(key)
            handles.append(self._handles.pop(key))
        return handles

    def held_bytes(self) -> int:
        """Bytes of shared buffers the cluster holds for this executor now."""
        with self._lock:
            return sum(self._sizes.values())

    def release(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._sizes.clear()
            self._users.clear()
            self._idle_since.clear()
            self._idle_bytes = 0
        self._drop(handles)


def _key_of(raw: memoryview) -> str:
    from dask.hashing import hash_buffer_hex

    return f"sulis-shared-{raw.nbytes}-{hash_buffer_hex(raw)}"


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
