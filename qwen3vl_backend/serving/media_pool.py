"""Bounded media work: SGLang's --mm-max-concurrent-calls and --mm-per-request-timeout.

At most `max_concurrent` media jobs (fetch, decode, resize, patchify) run at once; the rest wait
in arrival order (the executor's queue is FIFO). A request's media must all be done within
`timeout_s` of its submission, or the request fails with a clear timeout error. Ending a request
(its timeout, an error, or its `Cancel`) cancels its `Cancel`, which shuts the sockets of its
fetches still running, and its jobs still queued are skipped when their turn comes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

from ..processing.chat import RequestError
from ..processing.media import Cancel


class MediaTimeoutError(RequestError):
    pass


class RequestCancelled(RequestError):
    pass


class MediaPool:
    def __init__(self, max_concurrent: int, timeout_s: float):
        if max_concurrent < 1:
            raise ValueError("mm_max_concurrent_calls must be >= 1")
        if timeout_s <= 0:
            raise ValueError("mm_per_request_timeout must be > 0")
        self.max_concurrent, self.timeout_s = max_concurrent, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="media")

    def run_all(self, jobs: list, cancel: Cancel | None = None) -> list:
        """Run `job(cancel)` for each job -> results in order; raises the first job's error,
        MediaTimeoutError past the deadline, or RequestCancelled."""
        cancel = cancel or Cancel()
        deadline = time.monotonic() + self.timeout_s
        futures = [self._pool.submit(_unless_cancelled, job, cancel) for job in jobs]
        try:
            return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except FutureTimeout:
            raise MediaTimeoutError(f"media processing took longer than the {self.timeout_s:g}s "
                                    "per-request limit (mm_per_request_timeout)") from None
        finally:
            if not all(f.done() for f in futures):   # ended early: stop what is left of it
                cancel.cancel()
                for f in futures:
                    f.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unless_cancelled(job, cancel: Cancel):
    if cancel.is_set:                 # its request ended while this job waited its turn
        raise RequestCancelled("request cancelled")
    return job(cancel)
