"""Explicit cancellation by request id, for the decoupled Triton models (preprocess and llm).

Triton 2.51 does not pass a client's cancellation through an ensemble, so the OpenAI adapter
sends each model a `cancel=true` request with the same request id when its client goes away.
That cancel can arrive before the request itself does (it may still be in an earlier step of
the ensemble): it is then remembered for `ttl_s`, and the request is ended as soon as it
arrives. Requests without an id cannot be cancelled this way.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..processing.media import Cancel


class CancelRegistry:
    def __init__(self, ttl_s: float = 60.0, max_remembered: int = 10_000):
        self.ttl_s, self.max_remembered = ttl_s, max_remembered
        self._live: dict[str, list[Cancel]] = {}
        self._early: OrderedDict[str, float] = OrderedDict()     # id -> expiry of a cancel that came first
        self._lock = threading.Lock()

    def open(self, request_id: str) -> Cancel:
        """The Cancel of a request that just arrived (already set if its cancel came first)."""
        cancel = Cancel()
        if not request_id:
            return cancel
        with self._lock:
            early = self._early.pop(request_id, None)
            self._live.setdefault(request_id, []).append(cancel)
        if early is not None and early > time.monotonic():
            cancel.cancel()
        return cancel

    def close(self, request_id: str, cancel: Cancel) -> None:
        with self._lock:
            live = self._live.get(request_id)
            if live is not None and cancel in live:
                live.remove(cancel)
                if not live:
                    del self._live[request_id]

    def cancel(self, request_id: str) -> int:
        """Cancel the live requests with this id -> how many; remembered when none is live yet."""
        if not request_id:
            return 0
        now = time.monotonic()
        with self._lock:
            targets = list(self._live.get(request_id, ()))
            if not targets:
                self._early.pop(request_id, None)             # keeps the dict in expiry order
                self._early[request_id] = now + self.ttl_s
                while self._early and (len(self._early) > self.max_remembered
                                       or next(iter(self._early.values())) < now):
                    self._early.popitem(last=False)
        for c in targets:
            c.cancel()
        return len(targets)

    def num_live(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._live.values())
