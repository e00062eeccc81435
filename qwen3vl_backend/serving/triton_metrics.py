"""Engine statistics as Triton custom metrics (served on Triton's metrics port).

Gauges mirror the engine's state; counters are advanced by the difference to the last report,
since Triton's counters only increase.
"""

from __future__ import annotations

GAUGES = {
    "kv_cache_usage": "Fraction of KV cache blocks in use",
    "num_running": "Requests running in the engine",
    "num_waiting": "Requests queued in the engine",
}
COUNTERS = {
    "requests_cancelled": "Requests cancelled (client went away)",
    "num_preemptions": "Sequences preempted for recomputation",
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits": "Prompt tokens served from the prefix cache",
}


class TritonEngineMetrics:
    def __init__(self, pb_utils, model_name: str = "qwen3vl"):
        labels = {"model": model_name}
        # families must outlive their metrics, so both are kept
        self._families = {k: pb_utils.MetricFamily(f"qwen3vl_{k}", d, pb_utils.MetricFamily.GAUGE)
                          for k, d in GAUGES.items()}
        self._families.update({k: pb_utils.MetricFamily(f"qwen3vl_{k}_total", d, pb_utils.MetricFamily.COUNTER)
                               for k, d in COUNTERS.items()})
        self._gauges = {k: self._families[k].Metric(labels) for k in GAUGES}
        self._counters = {k: self._families[k].Metric(labels) for k in COUNTERS}
        self._last = {k: 0 for k in COUNTERS}

    def report(self, stats: dict) -> None:
        for k, m in self._gauges.items():
            m.set(float(stats[k]))
        for k, m in self._counters.items():
            delta = stats[k] - self._last[k]
            if delta > 0:
                m.increment(float(delta))
                self._last[k] = stats[k]
