"""Large arguments go to each worker once, not once per task.

A numpy array handed to every ``submit``, or bound into the function given to
``map`` with ``functools.partial``, would otherwise travel inside every
batch. Instead, while a batch is pickled, every large buffer it contains
(``bytes``, ``bytearray`` or a numpy array of at least ``SHARE_THRESHOLD``
bytes) is replaced by a reference, the pickle protocol's "persistent id".
The buffer itself is scattered to the cluster once, under a key derived from
its content, and handed to the batch's task as a Dask dependency, so each
worker fetches it once and keeps it while it is in use.

Content, not identity, names a buffer: an array changed in place between two
submits is sent again, as ``ProcessPoolExecutor`` would pickle it again. A
buffer stays on the cluster while batches that use it are in flight, and is
released a moment (``IDLE_RELEASE`` seconds) after the last of them, so a
buffer reused by batches sent one after another is not sent again, and the
cluster holds no inputs once the work is done.
"""

from __future__ import annotations

import collections
import io
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

#: Buffers at least this large are shared rather than pickled into batches.
SHARE_THRESHOLD = 1_000_000
#: Seconds an unused shared buffer stays on the cluster in case it is reused.
IDLE_RELEASE = 1.0


def is_large_buffer(obj: object) -> bool:
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj) >= SHARE_THRESHOLD  # type: ignore[arg-type]
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
        # Object arrays hold references, not a buffer: leave them to pickle.
        return int(getattr(obj, "nbytes", 0)) >= SHARE_THRESHOLD and getattr(obj, "dtype", None) != "O"
    return False


class _SharingPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, share: Callable[[object], str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._share = share
        self.keys: list[str] = []

    def persistent_id(self, obj: object) -> str | None:
        if is_large_buffer(obj):
            key = self._share(obj)
            self.keys.append(key)
            return key
        return None


class SharedBuffers:
    """The buffers this executor has put on the cluster, by content, with the
    number of batches in flight that use each. Used from one thread (the
    engine's sender) and the collector, so it locks."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._futures: dict[str, Any] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._idle_since: dict[str, float] = {}

    def _share(self, obj: object) -> str:
        from dask.base import tokenize

        key = f"sulis-shared-{tokenize(obj)}"
        with self._lock:
            known = key in self._futures
        if not known:
            (future,) = self._client.scatter({key: obj}, hash=False).values()
            with self._lock:
                self._futures.setdefault(key, future)
        return key

    def dumps(self, obj: object) -> tuple[bytes, list[str], list[Any]]:
        """Pickle ``obj`` for a batch about to be sent; return the payload,
        the shared keys it refers to, and their Dask futures (to pass to the
        task as dependencies). Call :meth:`done` with the keys when the batch
        is settled."""
        buffer = io.BytesIO()
        pickler = _SharingPickler(buffer, self._share)
        pickler.dump(obj)
        keys = list(dict.fromkeys(pickler.keys))
        with self._lock:
            self._users.update(keys)
            for key in keys:
                self._idle_since.pop(key, None)
            return buffer.getvalue(), keys, [self._futures[k] for k in keys]

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
            futures = [self._futures.pop(k) for k in expired]
            for key in expired:
                del self._idle_since[key]
        for future in futures:
            future.release()

    def release(self) -> None:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            self._users.clear()
            self._idle_since.clear()
        for future in futures:
            future.release()


def loads(payload: bytes, shared: dict[str, Any]) -> Any:
    """Unpickle a batch on a worker, resolving shared buffers."""
    if not shared:
        return cloudpickle.loads(payload)
    unpickler = pickle.Unpickler(io.BytesIO(payload))
    unpickler.persistent_load = shared.__getitem__  # type: ignore[assignment]
    return unpickler.load()
