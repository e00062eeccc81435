"""Runs the engine on its own thread; requests arrive from any thread, outputs leave by callback.

Triton's decoupled `execute` hands a request over and returns at once; this loop adds it to
the engine between steps, polls the requests' cancellation flags (a client that went away gets
its request aborted and its KV blocks freed), and hands every `RequestOutput`, or the exception
that refused a request, to that request's callback.

Both the flag and the callback's response are round trips to the Triton server, so neither
runs once per request per step on the engine's thread: flags are polled every
`cancel_poll_s`, and callbacks run on one delivery thread (one consumer keeps each request's
outputs in order) while the engine computes the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..engine.llm_engine import LLMEngine, RequestOutput
from ..errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class _Cancel:
    request_id: str


class EngineRequestError(RuntimeError):
    """A request the engine had to end because its own step failed (a server fault: HTTP 500)."""


class EngineClientError(RequestError):
    """A request the engine ended because of what it asked, mid-answer (its grammar past
    llguidance's limits): the client's, HTTP 400, with the reason."""


@dataclass
class _Submission:
    request_id: str
    prompt: object
    params: object
    vision_outputs: object
    on_output: Callable[[RequestOutput | Exception], None]
    is_cancelled: Callable[[], bool]


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, on_stats=None, cancel_poll_s: float = 0.1):
        self.engine = engine
        self._cancel_poll_s, self._next_poll = cancel_poll_s, 0.0
        self._outbox: queue.Queue = queue.Queue()
        self._deliverer = threading.Thread(target=self._deliver_loop, name="qwen3vl-deliver", daemon=True)
        self._deliverer.start()
        self._on_stats = on_stats
        self._last_stats: dict = {}
        self._inbox: queue.Queue[_Submission | _Cancel] = queue.Queue()
        self._live: dict[str, _Submission] = {}
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self.cancelled_total = 0
        self._thread = threading.Thread(target=self._run, name="qwen3vl-engine", daemon=True)
        self._thread.start()
        from ..engine.structured import warm_up          # the first constrained request does not build it

        warm_up(engine.cfg.model_path, engine.vocab_size, engine.eos_ids)

    def submit(self, request_id, prompt, params, on_output, is_cancelled=lambda: False, vision_outputs=None):
        self._inbox.put(_Submission(request_id, prompt, params, vision_outputs, on_output, is_cancelled))

    def cancel(self, request_id: str) -> None:
        """Abort a request from any thread (explicit cancellation; see model_repository/llm). It
        goes through the submissions' queue, so a cancel sent right after its submit finds it."""
        self._inbox.put(_Cancel(request_id))

    def num_live(self) -> int:
        return len(self._live)

    def stats(self) -> dict:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        return {"kv_cache_usage": bm.usage, "num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "requests_cancelled": self.cancelled_total, "num_preemptions": sched.num_preemptions,
                "prefix_cache_queries": bm.prefix_queries, "prefix_cache_hits": bm.prefix_hits}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._outbox.put(None)
        self._deliverer.join(timeout)
        self.engine.close()

    def _deliver(self, sub: _Submission, item) -> None:
        self._outbox.put((sub, item))

    def _deliver_loop(self) -> None:
        while (entry := self._outbox.get()) is not None:
            sub, item = entry
            try:
                sub.on_output(item)
            except Exception:
                log.exception("output callback for %s failed", sub.request_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not self.engine.has_unfinished())
                self._reap_cancelled()
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        sub = self._live.get(out.request_id)
                        if out.finished:
                            self._live.pop(out.request_id, None)
                        if sub is not None:
                            self._deliver(sub, out if out.error is None else (
                                EngineClientError if out.client_error else EngineRequestError)(out.error))
                if self._on_stats is not None:
                    stats = self.stats()
                    if stats != self._last_stats:
                        self._last_stats = stats
                        _report(self._on_stats, stats)
            except Exception as e:  # an engine failure must not strand callers: fail them all
                log.exception("engine step failed")
                for rid, sub in list(self._live.items()):
                    self.engine.abort(rid)
                    self._deliver(sub, RuntimeError(f"engine failure: {type(e).__name__}: {e}"))
                self._live.clear()

    def _admit(self, block: bool) -> None:
        try:
            sub = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(sub, _Cancel):
                self._abort(sub.request_id)
            else:
                try:
                    self.engine.add_request(sub.prompt, sub.params, sub.request_id, sub.vision_outputs)
                    self._live[sub.request_id] = sub
                except Exception as e:  # refused at the door (prompt too long, bad features): tell the caller
                    self._deliver(sub, e)
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self._cancel_poll_s
        for rid, sub in list(self._live.items()):
            if _safe(sub.is_cancelled):
                self._abort(rid)

    def _abort(self, rid: str) -> None:
        sub = self._live.pop(rid, None)
        if sub is None:
            return                          # already finished
        self.engine.abort(rid)
        self.cancelled_total += 1
        # the request still gets its final response: nothing is left open in Triton
        self._deliver(sub, RequestOutput(rid, [], "", True, "abort", 0, 0, 0))


def _report(on_stats, stats: dict) -> None:
    try:
        on_stats(stats)
    except Exception:  # metrics are best effort: never fail requests over them
        log.exception("reporting engine stats failed")


def _safe(fn) -> bool:
    try:
        return bool(fn())
    except Exception:  # a sender whose client is gone may raise instead of answering
        return True
