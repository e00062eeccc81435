"""--mm-max-concurrent-calls and --mm-per-request-timeout."""

import threading
import time

import pytest

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.processing.media import Cancel
from qwen3vl_backend.serving.media_pool import MediaPool, MediaTimeoutError, RequestCancelled


def test_at_most_n_jobs_run_and_the_rest_start_in_order():
    pool = MediaPool(max_concurrent=2, timeout_s=10)
    lock, running, peak, started = threading.Lock(), [0], [0], []

    def job(i):
        def run(cancel):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                started.append(i)
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return i * 10
        return run

    assert pool.run_all([job(i) for i in range(7)]) == [i * 10 for i in range(7)]
    assert peak[0] == 2 and started[2:] == sorted(started[2:])


def test_slow_media_fails_only_its_request():
    pool = MediaPool(max_concurrent=4, timeout_s=0.3)
    with pytest.raises(MediaTimeoutError, match=r"longer than the 0.3s per-request limit"):
        pool.run_all([lambda c: time.sleep(2)])
    assert pool.run_all([lambda c: "fine"]) == ["fine"]      # the next request is served normally


def test_a_cancelled_request_leaves_the_queue():
    """A request's jobs wait their turn in the pool; once it is cancelled (its client left), its
    fetches are told through the Cancel and its queued jobs are skipped when their turn comes."""
    import threading as th

    pool = MediaPool(max_concurrent=1, timeout_s=30)
    gate, ran, outcome = th.Event(), [], {}
    first = th.Thread(target=lambda: outcome.setdefault("a", pool.run_all([lambda c: gate.wait(5) and "first"])))
    first.start()
    time.sleep(0.1)
    cancel, told = Cancel(), []
    cancel.on_cancel(lambda: told.append("told"))

    def second():
        try:
            pool.run_all([lambda c: ran.append("b") or "b", lambda c: ran.append("c") or "c"], cancel)
        except RequestCancelled as e:
            outcome["b"] = e
    t = th.Thread(target=second)
    t.start()
    time.sleep(0.1)
    cancel.cancel()
    gate.set()
    first.join(5)
    t.join(5)
    assert outcome["a"] == ["first"] and isinstance(outcome["b"], RequestCancelled)
    assert ran == [] and told == ["told"]


def test_processor_media_through_the_pool(tiny_dense):
    proc = Processor(tiny_dense)
    img = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(100, 80, 1)))}}
    msgs = [{"role": "user", "content": [img, img, {"type": "text", "text": "two"}]}]
    pooled = proc.process_messages(msgs, run_jobs=MediaPool(2, 30).run_all)
    plain = proc.process_messages(msgs)
    assert pooled.prompt_ids == plain.prompt_ids and [m.content_hash for m in pooled.media] == \
        [m.content_hash for m in plain.media]


def test_pool_settings_are_checked():
    with pytest.raises(ValueError, match="mm_max_concurrent_calls must be >= 1"):
        MediaPool(0, 1)
    with pytest.raises(ValueError, match="mm_per_request_timeout must be > 0"):
        MediaPool(1, 0)
