"""Values built from files and rebuilt when the files change, off the event loop.

A :class:`Reloadable` reads its files and builds its value once when created (call that from a
worker thread, or at startup), then :meth:`~Reloadable.start` polls the files' ``stat`` from a daemon
thread. When any file changed (modification time, size or inode: Kubernetes swaps a Secret's
files by renaming a symlink, which changes the inode), the files are read and the value rebuilt
in that thread; readers then see the new value at once (one attribute, replaced whole). A new
version that does not load -- a half-written file, a key that does not match its certificate --
is logged once and the last good value stays; the next change is tried again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("modelyard.security")

T = TypeVar("T")
Stamp = tuple[tuple[int, int, int], ...]


class LoadError(ValueError):
    """Files that cannot be read or do not make a valid value; the message names the file and the problem."""


def _stamp(paths: Sequence[str]) -> Stamp:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((-1, -1, -1))
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def read_files(paths: Sequence[str]) -> dict[str, bytes]:
    """Every file's bytes; :class:`LoadError` naming the first that cannot be read."""
    data = {}
    for p in paths:
        try:
            with open(p, "rb") as f:
                data[p] = f.read()
        except OSError as exc:
            raise LoadError(f"{p}: {exc.strerror or exc}") from None
    return data


class Reloadable(Generic[T]):
    """``value`` built by ``build(files)`` from ``paths``; rebuilt when they change (see the module doc).

    ``generation`` counts successful (re)loads; readers that cache something derived from the value
    compare it. ``on_change(value)`` is called in the watcher thread after each reload.
    """

    def __init__(self, paths: Sequence[str], build: Callable[[Mapping[str, bytes]], T], *, what: str,
                 interval: float = 5.0, on_change: Callable[[T], None] | None = None) -> None:
        self.paths = tuple(paths)
        self.what = what
        self.interval = interval
        self._build = build
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: Stamp | None = None
        self.generation = 0
        self.reloads = 0
        self.failures = 0
        stamp, value = self._load()
        self._seen = stamp
        self.value: T = value

    def _load(self) -> tuple[Stamp, T]:
        # Read between two stats: files that changed meanwhile are read again (a writer's
        # half-done update is never taken for the new version).
        for _ in range(5):
            before = _stamp(self.paths)
            value = self._build(read_files(self.paths))
            if _stamp(self.paths) == before:
                return before, value
        raise LoadError(f"{self.what}: the files keep changing while being read")

    def check(self) -> bool:
        """Reload if the files changed since the last load; True when a new value was taken."""
        stamp = _stamp(self.paths)
        if stamp == self._seen:
            return False
        try:
            stamp, value = self._load()
        except Exception as exc:
            self.failures += 1
            if stamp != self._failed:
                log.error("%s: the changed files do not load, keeping the previous version: %s", self.what, exc)
                self._failed = stamp
            return False
        self._seen, self._failed = stamp, None
        self.value = value
        self.generation += 1
        self.reloads += 1
        log.info("%s reloaded from %s", self.what, ", ".join(self.paths))
        if self._on_change is not None:
            self._on_change(value)
        return True

    def start(self) -> None:
        """Watch the files from a daemon thread (no-op when ``interval`` is 0 or already started)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name=f"watch-{self.what}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the watcher die
                log.exception("%s: watching the files failed", self.what)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
