"""Where a request's time goes inside Triton, from its timestamp trace.

    python -m benchmarks.triton_trace TRACE.json [TRACE.json.N ...]

Start tritonserver with `--trace-config triton,file=PATH --trace-config level=TIMESTAMPS
--trace-config rate=1` (the launcher passes `QWEN3VL_TRITON_ARGS` through), then set
`log_frequency` to 1 over HTTP so each request lands in its own file. Prints, per ensemble
request, milliseconds from the moment Triton has read it: each model's queue, compute start and
end, and the first and last response sent back.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def requests(entries: list[dict]) -> list[dict]:
    names, parents, stamps = {}, {}, defaultdict(dict)
    for e in entries:
        if "model_name" in e:
            names[e["id"]], parents[e["id"]] = e["model_name"], e.get("parent_id")
        for ts in e.get("timestamps", []):
            stamps[e["id"]].setdefault(ts["name"], []).append(ts["ns"])
    out = []
    for root in (i for i in names if parents[i] is None):
        s = stamps[root]
        t0 = (s.get("GRPC_WAITREAD_END") or s.get("HTTP_RECV_END") or s["REQUEST_START"])[0]
        row = {"model": names[root], "first_response_ms": None, "last_response_ms": None}
        sends = sorted(s.get("GRPC_SEND_START", []) or s.get("INFER_RESPONSE_COMPLETE", []))
        if sends:
            row["first_response_ms"], row["last_response_ms"] = (sends[0] - t0) / 1e6, (sends[-1] - t0) / 1e6
        for child in (i for i in names if parents[i] == root):
            c = stamps[child]
            for key in ("QUEUE_START", "COMPUTE_START", "COMPUTE_END"):
                if key in c:
                    row[f"{names[child]}_{key.lower()}_ms"] = (min(c[key]) - t0) / 1e6
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    args = ap.parse_args(argv)
    for path in args.traces:
        with open(path) as f:
            for row in requests(json.load(f)):
                print(path, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
