"""Launch-table variants measured inside whole decode steps, one engine run each, in one lease.

    python -m benchmarks.engine_ab --variants variants.json -- --config Qwen3-VL-235B-A22B-Instruct-FP8 \
        --tp 2 --ep 2 --concurrency 1 --out-tokens 64

Isolated kernel timings have misled here again and again (NOTES: a norm_route shape 0.15 us
faster alone made the step 0.38 ms slower; a tuner's MoE table that lost in the step), while the
same code repeats to ~0.01 ms inside one lease (twelfth session). So a table entry is chosen
by running the engine benchmark once per variant. Each variant runs in its own copy of the code
(qwen3vl_kernels/, qwen3vl_backend/, benchmarks/) whose tables carry its patches; the unpatched tree runs
first and last, so drift within the lease shows. `variants.json`:

    {"n64s6": {"E=64,...,block=128x128.json": {"1": {"BLOCK_N": 64, "num_stages": 6}}}, ...}

A patch merges into the table's entry where both are objects, at every depth (a MoE table's
{"pairs": {"1": {...}}} takes one key of its nested entry), and replaces it otherwise. A
variant's "env" (in place of a table's name) sets environment variables for its run alone, for
the switches that are not tables: {"prefetch": {"env": {"QWEN3VL_PDL_PREFETCH": "1"}}}. A variant's
"args" adds flags to its benchmark run ({"fp8kv": {"args": ["--kv-cache-dtype", "fp8_e4m3"]}}). A
variant's "tree" copies another checkout's code instead of this one's (a path from the repository root, e.g.
an earlier commit unpacked by `git archive C kernels qwen3vl_backend benchmarks | tar -x -C .ab/C`):
{"before": {"tree": ".ab/C"}} measures a change that has no switch against the commit before it. Prints
a table of each variant's inter-token p50 and mean decode step per concurrency (and, with
--ttft-repeats, its TTFT p50 and min, compared by the p50), and writes JSON; after each variant
the rows so far are in engine-ab-partial.json in the same folder, for a run a time limit cuts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import RESULTS, print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
TREES = ("qwen3vl_kernels", "qwen3vl_backend", "benchmarks")
# a checkout from before the rename names its kernels' package `kernels/` (renamed: transformers 5.25
# brings Hugging Face's `kernels`); a tree of one runs as it was
OLD_KERNELS = "kernels"
BASE = "base"
PARTIAL = "engine-ab-partial.json"     # the rows so far; gone once the run's own JSON is written
# each row's columns from benchmarks.engine's rows (None where a variant did not run)
ROW_KEYS = ("concurrency", "routing", "itl_p50_ms", "decode_step_ms", "ttft_p50_ms", "ttft_min_ms",
            "floor_over_step", "kv_blocks")


def merged(old, patch):
    """`patch` over `old`: objects merge key by key, at every depth; anything else replaces."""
    if not (isinstance(old, dict) and isinstance(patch, dict)):
        return patch
    return {**old, **{key: merged(old.get(key), value) for key, value in patch.items()}}


ENV = "env"
TREE = "tree"
ARGS = "args"


def patch_tables(configs: Path, patches: dict) -> None:
    """Apply {table file: {key: patch}} to the tables under `configs` (a variant's copy); its "env"
    is not a table (run_variant's)."""
    for name, entries in patches.items():
        if name in (ENV, TREE, ARGS):
            continue
        path = configs / name
        if Path(name).name != name or not path.exists():
            raise SystemExit(f"variant patches {name!r}: no such table in qwen3vl_kernels/configs")
        shadows = shadowing_tables(configs, name, entries)
        if shadows:
            raise SystemExit(f"variant patches {name!r}, whose entries {sorted(shadows[0][1])} the shape's own "
                             f"table {shadows[0][0]!r} overrides with its \"pairs\" "
                             "(qwen3vl_kernels.fused_moe.pair_config): "
                             "patch that table's \"pairs\" instead")
        table = json.loads(path.read_text())
        path.write_text(json.dumps(merged(table, entries), indent=1) + "\n")


def shadowing_tables(configs: Path, name: str, entries: dict) -> list[tuple[str, set]]:
    """For a patch of the shape-free fp8 pair table ("fp8_pairs,device=D,block=B.json"): the MoE
    tables of that device and block whose own "pairs" come first for those sizes, so the patch
    would measure nothing (twice so far: NOTES, thirteenth and twenty-seventh sessions). [(table, sizes)]."""
    prefix, _, rest = name.partition(",")
    if prefix != "fp8_pairs":
        return []
    device, _, block = rest.removesuffix(".json").partition(",")
    found = []
    for other in sorted(configs.glob(f"E=*,{device},dtype=fp8_w8a8,{block}.json")):
        sizes = set(json.loads(other.read_text()).get("pairs") or {}) & set(entries)
        if sizes:
            found.append((other.name, sizes))
    return found


def make_tree(dest: Path, patches: dict) -> Path:
    source = ROOT / patches[TREE] if TREE in patches else ROOT
    old = not (source / TREES[0]).is_dir() and (source / OLD_KERNELS).is_dir()
    subs = (OLD_KERNELS if old else TREES[0], *TREES[1:])
    for sub in subs:
        if not (source / sub).is_dir():
            raise SystemExit(f"variant tree {patches[TREE]!r}: no {sub}/ there")
        shutil.copytree(source / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__", "results"))
    patch_tables(dest / subs[0] / "configs", patches)
    return dest


def run_variant(tree: Path, engine_args: list[str], runner: str, out: Path, extra_env: dict | None = None) -> list[dict]:
    """One engine run in `tree`, with `extra_env` set: its rows (the JSON the benchmark wrote under `out`)."""
    # the tree's packages first; the caller's path after it (a runner module of its own)
    env = {**os.environ, **{k: str(v) for k, v in (extra_env or {}).items()},
           "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", runner, *engine_args, "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    written = sorted(out.glob("*.json"))
    if proc.returncode != 0 or not written:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"{runner} in {tree} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(written[-1].read_text())["rows"]


def metric(row: dict):
    """A decode row's inter-token p50; a TTFT row's (--ttft-repeats; no concurrency) p50 TTFT."""
    return row["itl_p50_ms"] if row["concurrency"] is not None else row["ttft_p50_ms"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True, help="JSON file: {name: {table file: {key: patch}}}")
    ap.add_argument("--runner", default="benchmarks.engine", help="the benchmark module each variant runs")
    ap.add_argument("--between", default="", help="a shell command run after each variant, e.g. clearing up "
                    "workers a failed run left: 'pkill -f engine[.]tp_worker' (a pattern that does not match "
                    "this command line itself)")
    ap.add_argument("--out", default=None)
    ap.add_argument("engine_args", nargs=argparse.REMAINDER, help="after --: the engine benchmark's flags")
    args = ap.parse_args(argv)
    variants = json.loads(Path(args.variants).read_text())
    if BASE in variants or not variants:
        raise SystemExit(f"--variants: one or more variants, none named {BASE!r} (the unpatched tree)")
    engine_args = [a for a in args.engine_args if a != "--"]
    order = [BASE, *variants, BASE]
    rows = []
    settings = {"variants": variants, "engine_args": engine_args, "runner": args.runner}
    # the rows so far, after each variant: a run cut short by a time limit keeps what it measured
    partial = Path(args.out or RESULTS) / PARTIAL
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {name: make_tree(Path(tmp) / name, variants.get(name, {})) for name in dict.fromkeys(order)}
        for i, name in enumerate(order):
            label = name if i < len(order) - 1 else f"{BASE} (again)"
            try:
                got = [{"variant": label, "run": i, **{k: r.get(k) for k in ROW_KEYS}, "error": None}
                       for r in run_variant(trees[name], engine_args + list(variants.get(name, {}).get(ARGS, [])),
                                            args.runner, Path(tmp) / f"out-{i}", variants.get(name, {}).get(ENV))]
            except RuntimeError as e:           # a launch shape that does not compile: the others still run
                print(e)
                got = [{"variant": label, "run": i, **dict.fromkeys(ROW_KEYS), "error": str(e).splitlines()[0]}]
            print_table(got, list(got[0]))
            rows += got
            partial.write_text(json.dumps({"settings": settings, "rows": against_base(rows)}, indent=2))
            if args.between:
                subprocess.run(args.between, shell=True, check=False)
    print_table(against_base(rows), list(rows[0]))
    print(write_result("engine-ab", settings, rows, args.out))
    partial.unlink()
    return 0


def against_base(rows: list[dict]) -> list[dict]:
    """rows with vs_base: each metric over the first (unpatched) run's at its concurrency."""
    base = {r["concurrency"]: metric(r) for r in rows if r["run"] == 0}
    for r in rows:
        ref, value = base.get(r["concurrency"]), metric(r)
        r["vs_base"] = value / ref if ref and value is not None else None
    return rows


if __name__ == "__main__":
    sys.exit(main())
