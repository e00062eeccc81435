"""Bounded media work: SGLang's --mm-max-concurrent-calls and --mm-per-request-timeout.

At most `max_concurrent` media jobs (fetch, decode, resize, patchify) run at once; the rest wait
in arrival order (the executor's queue is FIFO). Submitting never blocks: the caller (a
decoupled Triton model) hands a request's jobs over and is called back once with the results,
or with the first error, the per-request timeout, or the request's cancellation. A job whose
request has already ended is skipped when its turn comes, and ending a request cancels its
`Cancel`, which shuts the sockets of its fetches still running.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..processing.chat import RequestError
from ..processing.media import Cancel


class MediaTimeoutError(RequestError):
    pass


class RequestCancelled(RequestError):
    pass


class _Timers:
    """One thread for every deadline: `add(when, fn)` calls fn at `when` unless `remove`d first."""

    def __init__(self):
        self._heap: list = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="media-deadlines", daemon=True).start()

    def add(self, when: float, fn: Callable[[], None]) -> int:
        with self._cv:
            key = next(self._ids)
            heapq.heappush(self._heap, (when, key, fn))
            self._live.add(key)
            self._cv.notify()
        return key

    def remove(self, key: int) -> None:
        with self._cv:
            self._live.discard(key)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, key, fn = heapq.heappop(self._heap)
                if key not in self._live:
                    continue
                self._live.discard(key)
            fn()


class _Request:
    """One request's jobs: results in order, delivered once."""

    def __init__(self, n: int, on_done: Callable, cancel: Cancel):
        self.results, self.left, self.on_done, self.cancel = [None] * n, n, on_done, cancel
        self.done, self.timer = False, None
        self.lock = threading.Lock()

    def finish(self, value) -> bool:
        with self.lock:
            if self.done:
                return False
            self.done = True
        self.on_done(value)
        if isinstance(value, Exception):
            self.cancel.cancel()          # stop its other jobs: fetch sockets close, queued jobs skip
        return True


class MediaPool:
    def __init__(self, max_concurrent: int, timeout_s: float):
        if max_concurrent < 1:
            raise ValueError("mm_max_concurrent_calls must be >= 1")
        if timeout_s <= 0:
            raise ValueError("mm_per_request_timeout must be > 0")
        self.max_concurrent, self.timeout_s = max_concurrent, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="media")
        self._timers = _Timers()

    def submit(self, jobs: list[Callable[[Cancel], object]], on_done: Callable[[list | Exception], None],
               cancel: Cancel | None = None) -> None:
        """Run `job(cancel)` for each job; `on_done(results in order)` once all are done, or
        `on_done(exception)` at the first error, the timeout or cancellation. Never blocks."""
        cancel = cancel or Cancel()
        req = _Request(len(jobs), on_done, cancel)
        if not jobs:
            req.finish([])
            return
        req.timer = self._timers.add(time.monotonic() + self.timeout_s, lambda: req.finish(MediaTimeoutError(
            f"media processing took longer than the {self.timeout_s:g}s per-request limit (mm_per_request_timeout)")))
        cancel.on_cancel(lambda: req.finish(RequestCancelled("request cancelled")))
        for i, job in enumerate(jobs):
            self._pool.submit(self._run, req, i, job)

    def _run(self, req: _Request, i: int, job) -> None:
        if req.done:
            return                        # its request ended while this job waited its turn
        try:
            result = job(req.cancel)
        except Exception as e:            # the job's own error fails its request, and only it
            if req.finish(e):
                self._timers.remove(req.timer)
            return
        with req.lock:
            req.results[i] = result
            req.left -= 1
            last = req.left == 0
        if last and req.finish(req.results):
            self._timers.remove(req.timer)

    def run_all(self, jobs: list, cancel: Cancel | None = None) -> list:
        """`submit`, waiting for the outcome (offline use and tests); raises the request's error."""
        done, box = threading.Event(), []
        self.submit(jobs, lambda value: (box.append(value), done.set()), cancel)
        done.wait()
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
