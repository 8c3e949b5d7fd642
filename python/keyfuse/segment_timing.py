"""Stage timing and the concurrent intensity normalisation of
:meth:`keyfuse.segment.KeypointTransferSegmenter.predict`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Concurrent(Generic[T]):
    """``fn()`` on a worker thread while the caller goes on (:meth:`result` waits for it
    and re-raises its exception); its own wall and CPU seconds in :attr:`wall` and
    :attr:`cpu` once done.

    predict normalises the intensities this way while extraction and matching run: those
    are Rust calls that release the GIL, and the normalisation is mostly numpy loops that
    release it too, so it fills the cores the Rust stages leave idle."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self.wall = 0.0
        self.cpu = 0.0
        self._done = False
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="keyfuse-normalise", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t, c = time.perf_counter(), time.thread_time()
        try:
            self._result = self._fn()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e
        finally:
            self.cpu = time.thread_time() - c
            self.wall = time.perf_counter() - t
            self._done = True

    def cpu_so_far(self) -> float:
        """The worker's CPU seconds so far (0 where the platform cannot tell)."""
        if self._done:
            return self.cpu
        ident = self._thread.ident
        try:
            if ident is None:
                return 0.0
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (AttributeError, OSError, ValueError):
            return 0.0 if not self._done else self.cpu

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class StageClock:
    """Wall and CPU (all threads, less a :class:`Concurrent` worker's) seconds per named
    stage."""

    def __init__(self, worker: Concurrent[Any] | None = None) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._worker = worker
        self._t = (0.0, 0.0, 0.0)

    def _worker_cpu(self) -> float:
        return self._worker.cpu_so_far() if self._worker is not None else 0.0

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time(), self._worker_cpu())

    def stop(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._t[0]
        cpu = time.process_time() - self._t[1] - (self._worker_cpu() - self._t[2])
        self.cpu[name] = max(cpu, 0.0)
