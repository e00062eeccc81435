"""The launcher: SGLang's flags and environment variables, resolved settings, clear refusals."""

import json
import shlex
import subprocess
import sys

import pytest

from qwen3vl_backend.launch import build_parser

# The SGLang Qwen3-VL guide's "example usage with the above optimizations", our module name,
# one GPU and dummy weights (as the issue asks).
GUIDE = """SGLANG_USE_CUDA_IPC_TRANSPORT=1 SGLANG_VLM_CACHE_SIZE_MB=0 python -m qwen3vl_backend.launch \
  --model-path Qwen/Qwen3-VL-235B-A22B-Instruct --host 0.0.0.0 --port 30000 --trust-remote-code \
  --tp-size 1 --enable-cache-report --log-level info --max-running-requests 64 --mem-fraction-static 0.65 \
  --chunked-prefill-size 8192 --attention-backend fa3 --mm-attention-backend fa3 --enable-metrics \
  --load-format dummy"""


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def _run(argv, env=None, extra_env=None):
    import os

    e = dict(os.environ if env is None else env)
    e.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "qwen3vl_backend.launch", *argv], capture_output=True, text=True,
                          env=e, timeout=120)


def _dry(argv, capsys) -> dict:
    """A dry run's report from this process (a launcher process took ~6 s a call), in the
    environment as the caller's monkeypatch left it."""
    from qwen3vl_backend.launch import _main

    capsys.readouterr()
    assert _main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def _report(out) -> dict:
    """A dry run's JSON report; its stderr when there is none."""
    assert out.returncode == 0 and out.stdout.strip(), f"exit {out.returncode}: {out.stderr[-2000:]}"
    return json.loads(out.stdout)


def test_every_guide_flag_is_understood():
    words = shlex.split(GUIDE)
    argv = words[words.index("qwen3vl_backend.launch") + 1:]
    args = build_parser().parse_args(argv)
    assert (args.tp, args.max_running_requests, args.chunked_prefill_size) == (1, 64, 8192)
    assert (args.attention_backend, args.mm_attention_backend, args.enable_metrics) == ("fa3", "fa3", True)


def test_guide_command_verbatim(tmp_path):
    words = shlex.split(GUIDE)
    env = dict(w.split("=", 1) for w in words[:2])
    argv = words[words.index("qwen3vl_backend.launch") + 1:] + ["--dry-run"]
    out = _run(argv, extra_env=env)
    if not _has_flash_attn():
        assert out.returncode != 0 and "fa3/fa2 attention needs the flash-attn package" in out.stderr
        argv = [a if a != "fa3" else "triton" for a in argv]        # the same command with our own kernels
        out = _run(argv, extra_env=env)
    assert out.returncode == 0, out.stderr
    report = _report(out)
    llm, vit, pre = (report["settings"][k] for k in ("llm", "vit", "preprocess"))
    assert (llm["max_num_seqs"], llm["max_num_batched_tokens"], llm["mem_fraction_static"]) == ("64", "8192", "0.65")
    assert llm["load_format"] == "dummy" and llm["model_path"].endswith("Qwen3-VL-235B-A22B-Instruct")
    assert vit["vlm_cache_size_mb"] == "0" and pre["use_cuda_ipc_transport"] == "1"


def test_our_own_environment_names_work_too():
    out = _run(["--model-path", "Qwen/Qwen3-VL-30B-A3B-Instruct", "--load-format", "dummy", "--dry-run"],
               extra_env={"QWEN3VL_VLM_CACHE_SIZE_MB": "512", "QWEN3VL_USE_CUDA_IPC_TRANSPORT": "true"})
    report = _report(out)
    assert report["settings"]["vit"]["vlm_cache_size_mb"] == "512"
    assert report["settings"]["preprocess"]["use_cuda_ipc_transport"] == "1"
    assert report["settings"]["vit"]["enable_vit_cuda_graph"] == "false"


def test_a_boolean_environment_setting_takes_the_one_spelling_rule(tiny_moe, monkeypatch, capsys):
    """SGLANG_USE_CUDA_IPC_TRANSPORT as any setting's boolean (config.parse_bool): "on" / "off"
    read, a word that is neither refused by name instead of read as off."""
    argv = ["--model-path", str(tiny_moe)]
    for word, want in (("on", "1"), ("OFF", "0"), ("yes", "1")):
        monkeypatch.setenv("SGLANG_USE_CUDA_IPC_TRANSPORT", word)
        assert _dry(argv, capsys)["settings"]["preprocess"]["use_cuda_ipc_transport"] == want
    monkeypatch.setenv("SGLANG_USE_CUDA_IPC_TRANSPORT", "enabled")
    with pytest.raises(SystemExit, match="USE_CUDA_IPC_TRANSPORT: 'enabled' is not a boolean"):
        _dry(argv, capsys)


def test_features_stay_on_the_gpu_and_the_vit_replays_graphs_by_default_on_a_gpu(capsys):
    """--keep-mm-feature-on-device (30 ms of a 1280x720 image's TTFT on an H200) and
    --enable-vit-cuda-graph (15 ms more) are the defaults on a GPU and off on the CPU;
    either way a flag or its --no- form decides, and --disable-cuda-graph turns the ViT's off too."""
    import torch

    gpu = "true" if torch.cuda.is_available() else "false"
    base = ["--model-path", "Qwen/Qwen3-VL-30B-A3B-Instruct", "--load-format", "dummy"]
    cases = [([], (gpu, gpu)), (["--device", "cpu"], ("false", "false")),
             (["--device", "cpu", "--keep-mm-feature-on-device", "--enable-vit-cuda-graph"], ("true", "true")),
             (["--no-keep-mm-feature-on-device", "--no-enable-vit-cuda-graph"], ("false", "false")),
             (["--keep-mm-feature-on-device"], ("true", gpu)), (["--disable-cuda-graph"], (gpu, "false")),
             (["--disable-cuda-graph", "--enable-vit-cuda-graph"], (gpu, "true"))]
    for extra, want in cases:
        vit = _dry(base + extra, capsys)["settings"]["vit"]
        assert (vit["keep_mm_feature_on_device"], vit["enable_vit_cuda_graph"]) == want, extra


def test_vit_cuda_graph_flag_reaches_the_vit_model(capsys):
    base = ["--model-path", "Qwen/Qwen3-VL-30B-A3B-Instruct", "--load-format", "dummy"]
    vit = _dry([*base, "--enable-vit-cuda-graph"], capsys)["settings"]["vit"]
    assert vit["enable_vit_cuda_graph"] == "true" and vit["vit_warmup_sizes"] == "1280x720"
    vit = _dry([*base, "--vit-warmup-sizes", " 1920X1080, 640x480"], capsys)["settings"]["vit"]
    assert vit["vit_warmup_sizes"] == "1920x1080,640x480"
    assert _dry([*base, "--vit-warmup-sizes", "none"], capsys)["settings"]["vit"]["vit_warmup_sizes"] == ""


def test_kv_cache_dtype_reaches_the_llm_model_and_another_nodes_ranks(capsys):
    """--kv-cache-dtype: auto by default, fp8 (vLLM's word) as fp8_e4m3 in the llm model's settings;
    a second node's tp_worker command carries it (its ranks' caches must match node 0's)."""
    from qwen3vl_backend import launch

    base = ["--model-path", "Qwen/Qwen3-VL-30B-A3B-Instruct", "--load-format", "dummy", "--device", "cpu"]
    assert _dry(base, capsys)["settings"]["llm"]["kv_cache_dtype"] == "auto"
    assert _dry([*base, "--kv-cache-dtype", "fp8"], capsys)["settings"]["llm"]["kv_cache_dtype"] == "fp8"
    from qwen3vl_backend.config import EngineConfig
    assert EngineConfig(model_path="x", load_format="dummy", device="cpu", kv_cache_dtype="fp8").kv_cache_dtype == \
        "fp8_e4m3"
    args = launch.build_parser().parse_args([*base, "--kv-cache-dtype", "fp8_e4m3"])
    assert launch._worker_flags(args)[-2:] == ["--kv-cache-dtype", "fp8_e4m3"]
    assert "--kv-cache-dtype" not in launch._worker_flags(launch.build_parser().parse_args(base))


def test_vit_warmup_sizes_are_the_graphs_a_vit_keeps():
    from qwen3vl_backend.engine.vision_graphs import MAX_EXACT
    from qwen3vl_backend.launch import MAX_WARM_SIZES

    assert MAX_WARM_SIZES == MAX_EXACT


@pytest.mark.parametrize("argv,message", [
    (["--tp", "8"], "--tp 8 needs 8 GPUs"),
    (["--ep-size", "4"], "--ep 4 must divide --tp 1"),
    (["--tp", "2", "--ep", "3", "--device", "cpu"], "--ep 3 must divide --tp 2"),
    (["--tp", "2", "--nnodes", "2", "--device", "cpu"], "--nnodes > 1 needs --dist-init-addr"),
    (["--tp", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000", "--device", "cpu"],
     "start this node's ranks with python -m qwen3vl_backend.engine.tp_worker"),
    (["--tp", "3", "--device", "cpu"], "query heads of 4 does not split over tensor-parallel size 3"),
    (["--mem-fraction-static", "1.5"], "mem_fraction_static must be in (0, 1)"),
    (["--max-running-requests", "0"], "max_num_seqs must be positive"),
    (["--kv-cache-dtype", "fp8_e5m2"], "kv_cache_dtype must be auto or fp8_e4m3 (fp8), got 'fp8_e5m2': fp8_e5m2 is "
                                       "not supported"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--preprocess-instances", "0"], "--preprocess-instances must be >= 1"),
    (["--limit-mm-per-prompt", "audio=3"], "limit_mm_per_prompt: 'audio'=3"),
    (["--limit-mm-per-prompt", "image=lots"], "neither JSON nor image=N,video=N"),
    (["--media-fetch-timeout", "0"], "media_fetch_timeout_s must be a positive number of seconds"),
    (["--max-media-mb", "-1"], "max_media_bytes must be positive"),
    (["--max-request-body-mb", "0"], "--max-request-body-mb must be positive"),
    (["--triton-shm-mb", "-1"], "--triton-shm-mb must be 0"),
    (["--vit-warmup-sizes", "1280*720"], "--vit-warmup-sizes: image size '1280*720': WIDTHxHEIGHT"),
    (["--vit-warmup-sizes", "0x720"], "--vit-warmup-sizes: image size '0x720'"),
    (["--vit-warmup-sizes", "1x1,2x2,3x3,4x4,5x5"], "--vit-warmup-sizes: 5 sizes, at most 4"),
    (["--vit-warmup-sizes", "1280x720,5000x10"], "--vit-warmup-sizes: aspect ratio 500 exceeds 200"),
])
def test_inconsistent_flags_are_refused(tiny_moe, argv, message, capsys, monkeypatch):
    """In this process (a launcher process took ~7 s a case): the launcher's own SystemExit, or
    argparse's message on stderr; a case not refused fails before anything is written or started.
    The next test checks one refusal through a real process."""
    from qwen3vl_backend import launch

    def started(*args, **kwargs):
        raise AssertionError(f"{argv} was not refused")

    monkeypatch.setattr(launch, "write_repository", started)
    if message.startswith("--tp") and "--device" not in argv:
        import torch
        if torch.cuda.device_count() >= int(argv[1]):
            pytest.skip("enough GPUs here")
    # too few GPUs is refused when starting; a dry run reports it and checks the rest (below)
    dry = [] if message.startswith("--tp 8 needs") else ["--dry-run"]
    with pytest.raises(SystemExit) as refused:
        launch._main(["--model-path", str(tiny_moe), *dry, *argv, "--repository", "/nonexistent/never-written"])
    assert refused.value.code != 0 and message in f"{refused.value.code}\n{capsys.readouterr().err}"


def test_a_refusal_ends_the_launcher_process_with_its_message(tiny_moe):
    out = _run(["--model-path", str(tiny_moe), "--dry-run", "--max-request-body-mb", "0", "--repository",
                "/nonexistent/never-written"])
    assert out.returncode == 1 and "--max-request-body-mb must be positive" in out.stderr
    out = _run(["--model-path", str(tiny_moe), "--dry-run", "--bogus-flag"])
    assert out.returncode == 2 and "unrecognized arguments: --bogus-flag" in out.stderr


# SGLang's guide for 235B-A22B on eight GPUs, our module name, dummy weights (#13)
GUIDE_8 = {
    "fp8": "--model-path Qwen/Qwen3-VL-235B-A22B-Instruct-FP8 --tp 8 --ep 8 --host 0.0.0.0 --port 30000 "
           "--keep-mm-feature-on-device",
    "bf16": "--model-path Qwen/Qwen3-VL-235B-A22B-Instruct --tp 8 --ep 8 --host 0.0.0.0 --port 30000",
}


@pytest.mark.parametrize("name", GUIDE_8)
def test_the_guides_eight_gpu_commands_resolve_in_a_dry_run(name):
    """Every check but the GPU count passes here: the layout (4 KV heads replicated over 8 ranks,
    16 whole experts per rank, fp8 blocks), the settings handed to Triton, the per-GPU weights."""
    import torch

    out = _run([*shlex.split(GUIDE_8[name]), "--load-format", "dummy", "--dry-run"])
    assert out.returncode == 0, out.stderr
    report = _report(out)
    llm = report["settings"]["llm"]
    assert (llm["tp_size"], llm["ep_size"]) == ("8", "8")
    assert report["settings"]["weights_dtype"] == "bfloat16"
    per_gpu = report["settings"]["weights_gb_per_gpu"]
    assert (29 < per_gpu < 36) if name == "fp8" else (55 < per_gpu < 65)      # ~236 / 471 GB over 8, ViT on rank 0
    if torch.cuda.device_count() < 8:
        assert "--tp 8 needs 8 GPUs" in report["settings"]["warnings"][0]


def test_unknown_model_name_is_refused_with_the_choices():
    out = _run(["--model-path", "Qwen/Not-A-Model", "--load-format", "dummy", "--dry-run"])
    assert out.returncode != 0 and "Qwen3-VL-30B-A3B-Instruct" in out.stderr and "no hub is reached" in out.stderr


def test_dry_run_reports_the_repository(tiny_moe, tmp_path):
    out = _run(["--model-path", str(tiny_moe), "--repository", str(tmp_path / "repo"), "--dry-run",
                "--disable-radix-cache", "--disable-overlap-schedule", "--mm-attention-backend", "triton"])
    report = _report(out)
    assert report["repository"] == str(tmp_path / "repo") and not (tmp_path / "repo").exists()
    assert report["settings"]["llm"]["enable_prefix_cache"] == "false"
    assert report["settings"]["llm"]["overlap_schedule"] == "false"
    assert report["settings"]["vit"]["mm_attention_backend"] == "triton"
    graphs = {k: report["settings"]["llm"][k]
              for k in ("cuda_graph_max_bs", "prefill_cuda_graph_max_tokens", "prefill_cuda_graph_max_seqs")}
    assert graphs == {"cuda_graph_max_bs": "128", "prefill_cuda_graph_max_tokens": "4096",
                      "prefill_cuda_graph_max_seqs": "4"}


def test_disable_cuda_graph_turns_off_decode_and_prefill_graphs(tiny_moe):
    out = _run(["--model-path", str(tiny_moe), "--dry-run", "--disable-cuda-graph", "--cuda-graph-max-bs", "16"])
    llm = _report(out)["settings"]["llm"]
    assert (llm["cuda_graph_max_bs"], llm["prefill_cuda_graph_max_tokens"]) == ("0", "0")
    out = _run(["--model-path", str(tiny_moe), "--dry-run", "--prefill-cuda-graph-max-tokens", "-1"])
    assert out.returncode != 0 and "prefill_cuda_graph_max_tokens must be >= 0" in out.stderr
    out = _run(["--model-path", str(tiny_moe), "--dry-run", "--prefill-cuda-graph-max-seqs", "0"])
    assert out.returncode != 0 and "prefill_cuda_graph_max_seqs must be >= 1, got 0" in out.stderr


@pytest.mark.parametrize("calls,instances,want", [(32, 4, (4, "8")), (2, 4, (2, "1")), (5, 2, (2, "2")),
                                                  (1, 1, (1, "1"))])
def test_media_bound_is_server_wide_across_preprocess_instances(calls, instances, want):
    out = _run(["--model-path", "Qwen/Qwen3-VL-30B-A3B-Instruct", "--load-format", "dummy", "--dry-run",
                "--mm-max-concurrent-calls", str(calls), "--preprocess-instances", str(instances)])
    report = _report(out)["settings"]
    got = (report["instances"]["preprocess"], report["preprocess"]["mm_max_concurrent_calls"])
    assert got == want and got[0] * int(got[1]) <= calls


def test_repository_gets_the_preprocess_instance_count(tmp_path):
    from qwen3vl_backend.launch import write_repository

    repo = write_repository(tmp_path / "repo", {"preprocess": {"mm_max_concurrent_calls": "5"}},
                            instances={"preprocess": 3})
    text = (repo / "preprocess" / "config.pbtxt").read_text()
    assert "count: 3 kind: KIND_CPU" in text and 'string_value: "5"' in text
    assert "count: 1 kind: KIND_CPU" in (repo / "llm" / "config.pbtxt").read_text()


def test_weights_past_the_gpu_budget_are_refused_before_starting(monkeypatch):
    """The guide's 235B on one 80 GB GPU: a clear refusal from the launcher, not an OOM in Triton."""
    from types import SimpleNamespace

    import torch

    from qwen3vl_backend import launch

    configs = launch.ROOT / "qwen3vl_backend" / "data" / "configs"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    cfg = SimpleNamespace(device="cuda", torch_dtype=torch.bfloat16, dtype="bfloat16", mem_fraction_static=0.65,
                          quantization="", tp_size=1, ep_size=1)
    with pytest.raises(SystemExit, match=r"its weights need 471\.3 GB \(bfloat16\) but --mem-fraction-static 0\.65 "
                                         r"of this GPU's 80\.0 GB is 52\.0 GB"):
        launch._check_weights_fit(str(configs / "Qwen3-VL-235B-A22B-Instruct.json"), cfg)
    launch._check_weights_fit(str(configs / "Qwen3-VL-4B-Instruct.json"), cfg)        # 8.9 GB: fits
    # fp8 bytes are what count: the FP8 release and --quantization fp8 fit where bf16 does not
    with pytest.raises(SystemExit, match=r"its weights need 62\.\d GB"):
        launch._check_weights_fit(str(configs / "Qwen3-VL-30B-A3B-Instruct.json"), cfg)
    launch._check_weights_fit(str(configs / "Qwen3-VL-30B-A3B-Instruct-FP8.json"), cfg)          # 32.2 GB
    launch._check_weights_fit(str(configs / "Qwen3-VL-30B-A3B-Instruct.json"), SimpleNamespace(**{**vars(cfg),
                                                                                                  "quantization": "fp8"}))
    # per GPU under tp/ep: the guide's --tp 8 --ep 8 of 235B fits 80 GB GPUs in fp8, not in bf16
    tp8 = SimpleNamespace(**{**vars(cfg), "tp_size": 8, "ep_size": 8})
    with pytest.raises(SystemExit, match=r"its weights need 60\.\d GB per GPU at --tp 8 \(bfloat16\)"):
        launch._check_weights_fit(str(configs / "Qwen3-VL-235B-A22B-Instruct.json"), tp8)
    launch._check_weights_fit(str(configs / "Qwen3-VL-235B-A22B-Instruct-FP8.json"), tp8)
    with pytest.raises(SystemExit, match=r"is 192, not fp8 blocks of \[128, 128\]; use --ep 2"):
        launch._check_weights_fit(str(configs / "Qwen3-VL-235B-A22B-Instruct-FP8.json"),
                                  SimpleNamespace(**{**vars(cfg), "tp_size": 8}))


def test_dry_run_names_every_address_and_triton_stays_on_loopback(tiny_moe):
    base = ["--model-path", str(tiny_moe), "--dry-run", "--host", "0.0.0.0", "--port", "30000", "--enable-metrics"]
    listening = {(x["service"].split(" (")[0], x["address"], x["port"]) for x in _report(_run(base))["listening"]}
    assert listening == {("OpenAI API", "0.0.0.0", 30000), ("Triton gRPC", "127.0.0.1", 8001),
                         ("Triton HTTP", "127.0.0.1", 8080), ("Triton metrics", "127.0.0.1", 8002)}
    exposed = _report(_run([*base, "--triton-host", "0.0.0.0"]))["listening"]
    assert {x["address"] for x in exposed} == {"0.0.0.0"}


def test_media_flags_reach_preprocess_and_the_adapter(tiny_moe, tmp_path):
    from qwen3vl_backend import launch

    argv = ["--model-path", str(tiny_moe), "--allowed-media-domains", "a.example", "b.example",
            "--allow-private-media-urls", "--limit-mm-per-prompt", '{"image": 3}', "--max-media-mb", "2",
            "--allowed-local-media-path", str(tmp_path), "--context-length", "4096", "--triton-shm-mb", "0"]
    args = launch.build_parser().parse_args(argv)
    settings = launch.resolve(args)
    pre = settings["preprocess"]
    assert (pre["allowed_media_domains"], pre["allow_private_media_urls"], pre["max_model_len"]) == \
        ("a.example,b.example", "true", "4096")
    front = launch.frontend_args(args, settings)
    assert front[front.index("--allowed-media-domains") + 1:][:2] == ["a.example", "b.example"]
    assert "--allow-private-media-urls" in front and front[front.index("--max-media-mb") + 1] == "2.0"
    assert front[front.index("--limit-mm-per-prompt") + 1] == '{"image": 3}'
    assert front[front.index("--triton-shm-mb") + 1] == "0"
    from openai_frontend.__main__ import build_settings
    assert build_settings(front)[0].triton_shm_bytes == 0


def test_readme_shows_what_make_serve_prints():
    """The README's block of `make serve` output is the launcher's own banner for those flags."""
    from qwen3vl_backend import launch

    make = (launch.ROOT / "Makefile").read_text()
    line = next(x for x in make.splitlines() if "qwen3vl_backend.launch" in x)
    argv = shlex.split(line.split("qwen3vl_backend.launch", 1)[1].replace("$(MODEL)", ".cache/tiny-moe"))
    banner = launch.banner(launch.build_parser().parse_args(argv), "tiny-moe")
    assert banner in (launch.ROOT / "README.md").read_text()


def test_a_failed_dummy_model_write_leaves_nothing_a_later_launch_would_take(tmp_path, monkeypatch):
    """--load-format dummy writes the model directory aside and renames it into place: a write
    that fails midway (on the GPU host: no tokenizer source) left config.json alone, which every
    later launch took as a model and then failed on the missing tokenizer."""
    from qwen3vl_backend import launch
    from qwen3vl_backend.tools import make_tiny_checkpoint

    monkeypatch.setattr(launch, "SERVE_MODELS", tmp_path)
    name = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    out = tmp_path / "Qwen3-VL-30B-A3B-Instruct"

    def failing(d, cfg):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg))
        raise FileNotFoundError("no tokenizer source")

    monkeypatch.setattr(make_tiny_checkpoint, "write_model_dir", failing)
    with pytest.raises(FileNotFoundError):
        launch._model_dir(name, "dummy")
    assert list(tmp_path.iterdir()) == []

    writes = []

    def working(d, cfg):
        writes.append(d)
        d.mkdir(parents=True)
        for f in ("config.json", "tokenizer.json"):
            (d / f).write_text("{}")

    out.mkdir()
    (out / "config.json").write_text("{}")                      # a half directory from an older launcher
    monkeypatch.setattr(make_tiny_checkpoint, "write_model_dir", working)
    assert launch._model_dir(name, "dummy") == str(out) and (out / "tokenizer.json").exists()
    assert launch._model_dir(name, "dummy") == str(out) and len(writes) == 1     # complete: reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_images_are_resized_on_the_vits_gpu_unless_asked_otherwise(tiny_moe, monkeypatch):
    """resolve(): preprocess sends images unresized (resize_on_vit) where the models run on a GPU,
    not on a CPU, and not with --resize-images-on-host. The GPU is pretended (no CUDA here): only
    the settings are resolved."""
    import torch

    from qwen3vl_backend import launch

    def settings(*flags):
        return launch.resolve(build_parser().parse_args(["--model-path", str(tiny_moe), *flags]))["preprocess"]
    assert settings()["resize_on_vit"] == ("true" if torch.cuda.is_available() else "false")
    assert settings("--device", "cpu")["resize_on_vit"] == "false"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 1)
    monkeypatch.setattr(launch, "_check_weights_fit", lambda path, cfg: 0)
    assert settings("--device", "cuda")["resize_on_vit"] == settings()["resize_on_vit"] == "true"   # auto: cuda
    assert settings("--device", "cuda", "--resize-images-on-host")["resize_on_vit"] == "false"


def test_jpegs_are_decoded_on_the_vits_gpu_where_nvjpeg_loads(tiny_moe, monkeypatch):
    """resolve(): preprocess sends baseline JPEGs undecoded (decode_jpeg_on_vit) where the vit
    resizes images on a GPU and an nvJPEG library loads; not on a CPU, not without the library,
    not with --decode-images-on-host or --resize-images-on-host. The GPU is pretended."""
    import torch

    from qwen3vl_backend import launch
    from qwen3vl_backend.processing import jpeg_gpu

    def settings(*flags):
        return launch.resolve(build_parser().parse_args(["--model-path", str(tiny_moe), *flags]))["preprocess"]
    assert settings("--device", "cpu")["decode_jpeg_on_vit"] == "false"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 1)
    monkeypatch.setattr(launch, "_check_weights_fit", lambda path, cfg: 0)
    for loads in (True, False):
        monkeypatch.setattr(jpeg_gpu, "library_available", lambda: loads)
        assert settings("--device", "cuda")["decode_jpeg_on_vit"] == str(loads).lower()
    monkeypatch.setattr(jpeg_gpu, "library_available", lambda: True)
    assert settings("--device", "cuda", "--decode-images-on-host")["decode_jpeg_on_vit"] == "false"
    assert settings("--device", "cuda", "--resize-images-on-host")["decode_jpeg_on_vit"] == "false"
