"""benchmarks.engine_ab: each variant runs in its own tree with its table patches, the unpatched
tree first and last, and the rows say which is which (a stand-in runner reads the tables)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.engine_ab import main, patch_tables, shadowing_tables

TABLE = "norm_route,device=NVIDIA_H200.json"
HERE = Path(__file__).resolve().parent


def test_variants_run_in_their_own_trees(tmp_path, monkeypatch, capsys):
    original = (HERE.parent / "qwen3vl_kernels" / "configs" / TABLE).read_text()
    base = json.loads(original)["2048,128"]
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"wide": {TABLE: {"2048,128": {"BLOCK_E": 16}}},
                                    "whole": {TABLE: {"2048,128": {"BLOCK_E": 32, "num_warps": 1}}},
                                    "scaled": {"env": {"ENGINE_AB_TEST_SCALE": 3}}}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    between = tmp_path / "between.log"
    assert main(["--variants", str(variants), "--runner", "engine_ab_runner", "--out", str(tmp_path / "res"),
                 "--between", f"echo ran >> {between}", "--", "--concurrency", "1,2", "--ttft-repeats", "2"]) == 0
    assert between.read_text().split() == ["ran"] * 5
    written = json.loads(next((tmp_path / "res").glob("engine-ab-*.json")).read_text())
    ttft = [(r["variant"], r["ttft_p50_ms"], r["vs_base"]) for r in written["rows"] if r["concurrency"] is None]
    b10 = 10.0 * float(base["BLOCK_E"])
    assert ttft == [("base", b10, 1.0), ("wide", 160.0, pytest.approx(160.0 / b10)), ("whole", 320.0, pytest.approx(320.0 / b10)),
                    ("scaled", 3 * b10, pytest.approx(3.0)), ("base (again)", b10, 1.0)]
    got = [(r["variant"], r["concurrency"], r["itl_p50_ms"], r["decode_step_ms"]) for r in written["rows"]
           if r["concurrency"] is not None]
    b, w = float(base["BLOCK_E"]), float(base["num_warps"])
    assert got == [("base", 1, b, w), ("base", 2, 2 * b, w), ("wide", 1, 16.0, w), ("wide", 2, 32.0, w),
                   ("whole", 1, 32.0, 1.0), ("whole", 2, 64.0, 1.0), ("scaled", 1, 3 * b, w),
                   ("scaled", 2, 6 * b, w), ("base (again)", 1, b, w), ("base (again)", 2, 2 * b, w)]
    # each decode row says how its experts were routed (the runner's default, as benchmarks.engine's)
    assert {r["routing"] for r in written["rows"] if r["concurrency"] is not None} == {"uniform"}
    assert "ENGINE_AB_TEST_SCALE" not in os.environ           # the variant's environment was its own
    assert [r["vs_base"] for r in written["rows"] if r["concurrency"] is not None][2] == pytest.approx(16.0 / b)
    assert (HERE.parent / "qwen3vl_kernels" / "configs" / TABLE).read_text() == original      # the checkout untouched
    assert not (tmp_path / "res" / "engine-ab-partial.json").exists()                # done: the whole JSON only


def test_a_variant_tree_runs_another_checkouts_code(tmp_path, monkeypatch):
    """A variant's "tree": another checkout's code (here a copy whose table differs, as an earlier
    commit's would, in an earlier commit's layout: the kernels' package was `kernels/` then), with
    the variant's env on top; a tree without the code is refused."""
    import shutil

    alt = tmp_path / "alt"
    for sub, name in (("qwen3vl_kernels", "kernels"), ("qwen3vl_backend", None), ("benchmarks", None)):
        shutil.copytree(HERE.parent / sub, alt / (name or sub), ignore=shutil.ignore_patterns("__pycache__", "results"))
    table = alt / "kernels" / "configs" / TABLE
    table.write_text(json.dumps({"2048,128": {"BLOCK_E": 5, "num_warps": 1}}))
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"before": {"tree": str(alt)}, "before-x2": {"tree": str(alt),
                                                                              "env": {"ENGINE_AB_TEST_SCALE": 2}}}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    assert main(["--variants", str(variants), "--runner", "engine_ab_runner", "--out", str(tmp_path / "res")]) == 0
    rows = json.loads(next((tmp_path / "res").glob("engine-ab-*.json")).read_text())["rows"]
    base = float(json.loads((HERE.parent / "qwen3vl_kernels" / "configs" / TABLE).read_text())["2048,128"]["BLOCK_E"])
    assert [(r["variant"], r["itl_p50_ms"]) for r in rows] == [("base", base), ("before", 5.0), ("before-x2", 10.0),
                                                              ("base (again)", base)]
    variants.write_text(json.dumps({"gone": {"tree": str(tmp_path / "nowhere")}}))
    with pytest.raises(SystemExit, match="no qwen3vl_kernels/ there"):
        main(["--variants", str(variants), "--runner", "engine_ab_runner", "--out", str(tmp_path / "res2")])


def test_a_variants_args_reach_its_run_alone(tmp_path, monkeypatch):
    """A variant's "args" are added to the benchmark's flags for its run only (here the runner's
    --routing, which its rows report; e.g. --kv-cache-dtype fp8_e4m3 for the engine)."""
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"measured": {"args": ["--routing", "measured"]}}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    assert main(["--variants", str(variants), "--runner", "engine_ab_runner", "--out", str(tmp_path / "res"),
                 "--", "--concurrency", "1"]) == 0
    rows = json.loads(next((tmp_path / "res").glob("engine-ab-*.json")).read_text())["rows"]
    assert [(r["variant"], r["routing"]) for r in rows] == [("base", "uniform"), ("measured", "measured"),
                                                            ("base (again)", "uniform")]


def test_a_run_cut_short_keeps_the_variants_it_measured(tmp_path):
    """A time limit that kills the run after its second variant (here --between kills it) leaves
    engine-ab-partial.json with the rows measured so far, compared with the base's."""
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"wide": {TABLE: {"2048,128": {"BLOCK_E": 16}}},
                                    "whole": {TABLE: {"2048,128": {"BLOCK_E": 32}}}}))
    count = tmp_path / "count"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    between = f"echo x >> {count}; [ $(wc -l < {count}) -ge 2 ] && kill -9 $PPID"
    done = subprocess.run([sys.executable, "-m", "benchmarks.engine_ab", "--variants", str(variants), "--runner",
                           "engine_ab_runner", "--out", str(tmp_path / "res"), "--between", between],
                          cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    assert [f.name for f in (tmp_path / "res").iterdir()] == ["engine-ab-partial.json"]    # no whole JSON
    rows = json.loads((tmp_path / "res" / "engine-ab-partial.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "wide"]
    assert rows[1]["itl_p50_ms"] == 16.0 and rows[1]["vs_base"] == pytest.approx(16.0 / rows[0]["itl_p50_ms"])


def test_a_failing_variant_is_a_row_and_the_rest_still_run(tmp_path, monkeypatch):
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"broken": {TABLE: {"2048,128": {"num_warps": "many"}}},
                                    "wide": {TABLE: {"2048,128": {"BLOCK_E": 16}}}}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    assert main(["--variants", str(variants), "--runner", "engine_ab_runner", "--out", str(tmp_path / "res")]) == 0
    rows = json.loads(next((tmp_path / "res").glob("engine-ab-*.json")).read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "broken", "wide", "base (again)"]
    assert rows[1]["itl_p50_ms"] is None and "engine_ab_runner" in rows[1]["error"] and "failed" in rows[1]["error"]
    assert rows[2]["itl_p50_ms"] == 16.0 and rows[2]["error"] is None


def test_patches_merge_objects_replace_the_rest_and_name_real_tables(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"1": {"a": 1, "b": 2}, "k": 3,
                                                 "pairs": {"1": {"a": 1, "b": 2}, "4": {"a": 0}}}))
    patch_tables(tmp_path, {"t.json": {"1": {"b": 5}, "k": 4, "new": {"c": 1}, "pairs": {"1": {"b": 6}}}})
    # nested entries merge too: the MoE table's "pairs" keeps its other sizes and keys
    assert json.loads((tmp_path / "t.json").read_text()) == {
        "1": {"a": 1, "b": 5}, "k": 4, "new": {"c": 1}, "pairs": {"1": {"a": 1, "b": 6}, "4": {"a": 0}}}
    for bad in ("missing.json", "../t.json"):
        with pytest.raises(SystemExit, match="no such table"):
            patch_tables(tmp_path, {bad: {}})


def test_a_variant_named_base_is_refused(tmp_path):
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"base": {}}))
    with pytest.raises(SystemExit, match="none named 'base'"):
        main(["--variants", str(variants)])


def test_a_pair_patch_that_a_shape_table_overrides_is_refused(tmp_path):
    """qwen3vl_kernels.fused_moe.pair_config reads a MoE shape table's own "pairs" before the shape-free
    fp8 pair table, so a variant patching the latter at a size the former holds measures nothing
    (it happened twice). Refused; sizes the shape table lacks, and other devices' tables, pass.
    And the committed variant files patch no shadowed entry."""
    pairs = "fp8_pairs,device=NVIDIA_H200,block=128x128.json"
    shape = "E=128,N=768,K=2048,device=NVIDIA_H200,dtype=fp8_w8a8,block=128x128.json"
    (tmp_path / pairs).write_text(json.dumps({"1": {"a": 1}, "4": {"a": 1}}))
    (tmp_path / shape).write_text(json.dumps({"16": {}, "pairs": {"1": {"a": 2}}}))
    (tmp_path / "E=128,N=768,K=2048,device=NVIDIA_H100,dtype=fp8_w8a8,block=128x128.json").write_text(
        json.dumps({"pairs": {"4": {"a": 2}}}))
    with pytest.raises(SystemExit, match=r"\['1'\].*E=128,N=768,K=2048,device=NVIDIA_H200"):
        patch_tables(tmp_path, {pairs: {"1": {"a": 3}}})
    patch_tables(tmp_path, {pairs: {"4": {"a": 3}}})
    assert json.loads((tmp_path / pairs).read_text())["4"] == {"a": 3}
    patch_tables(tmp_path, {shape: {"pairs": {"1": {"a": 3}}}})
    assert json.loads((tmp_path / shape).read_text())["pairs"]["1"] == {"a": 3}
    configs = HERE.parent / "qwen3vl_kernels" / "configs"
    for path in (HERE.parent / "benchmarks" / "variants").glob("*.json"):
        for variant, patches in json.loads(path.read_text()).items():
            for name, entries in patches.items():
                assert not shadowing_tables(configs, name, entries), (path.name, variant, name)
