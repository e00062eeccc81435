"""End to end against a real tritonserver (started once for the module) and the OpenAI adapter."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import functools
import http.server
import json
import queue
import re
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import data_uri, image_bytes, make_image, start_server
from qwen3vl_backend import generate
from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.launch import write_repository
from qwen3vl_backend.sampling_params import SamplingParams

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")
MAX_TOKENS = 16
MAX_MODEL_LEN = 1024
MEDIA_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, video_file):
    d = tmp_path_factory.mktemp("allowed")
    (d / "cat.png").write_bytes(image_bytes(make_image(160, 120, 11)))
    (d / "clip.mp4").write_bytes(video_file.read_bytes())
    return d


@pytest.fixture(scope="module")
def http_media(tmp_path_factory):
    """A local HTTP server for media URLs."""
    d = tmp_path_factory.mktemp("web")
    (d / "dog.png").write_bytes(image_bytes(make_image(200, 100, 12)))
    (d / "slow.png").write_bytes(image_bytes(make_image(64, 64, 13)))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(MEDIA_TIMEOUT_S + 2)
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Handler, directory=str(d))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(tiny_moe, media_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    common = {"model_path": str(tiny_moe), "device": "cpu"}
    repo = write_repository(root / "repo", {
        # the test's media server is on loopback: this server opts in to private addresses
        "preprocess": {"model_path": str(tiny_moe), "media_fetch_timeout_s": "10", "allow_private_media_urls": "true",
                       "max_model_len": str(MAX_MODEL_LEN), "mm_per_request_timeout": str(MEDIA_TIMEOUT_S),
                       "mm_max_concurrent_calls": "4"},
        "vit": {**common, "vlm_cache_size_mb": "64"},
        "llm": {**common, "max_model_len": str(MAX_MODEL_LEN), "max_num_seqs": "16"},
    })
    srv = start_server(repo, root, ["--allowed-local-media-path", str(media_dir), "--enable-cache-report",
                                    "--allow-private-media-urls", "--mm-per-request-timeout", str(MEDIA_TIMEOUT_S),
                                    "--mm-max-concurrent-calls", "4"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def local_engine(tiny_moe):
    return LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu", dtype="float32"))


def _expected(tiny_moe, local_engine, messages):
    return generate.run(str(tiny_moe), {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS},
                        engine=local_engine)


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny-moe", messages=messages, temperature=0, max_tokens=MAX_TOKENS, **kw)


def _stream_text(client, messages):
    parts, usage = [], None
    for ch in _chat(client, messages, stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    return "".join(parts), usage


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _cases(media_dir, http_media):
    a, b = make_image(300, 200, 1), make_image(120, 180, 2)
    return {
        "text": [{"role": "user", "content": "Tell me about the sea."}],
        "data_uri_image": [{"role": "user", "content": [_img(data_uri(image_bytes(a))), {"type": "text", "text": "What?"}]}],
        "http_image": [{"role": "user", "content": [_img(f"{http_media}/dog.png"), {"type": "text", "text": "Who?"}]}],
        "file_image": [{"role": "user", "content": [_img((media_dir / "cat.png").as_uri()), {"type": "text", "text": "Hm?"}]}],
        "two_images": [{"role": "user", "content": [_img(data_uri(image_bytes(a))), _img(data_uri(image_bytes(b))),
                                                    {"type": "text", "text": "Compare."}]}],
        "video": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": (media_dir / "clip.mp4").as_uri()}},
                                               {"type": "text", "text": "What happens?"}]}],
        "system_multi_turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": [_img(data_uri(image_bytes(b))), {"type": "text", "text": "This?"}]}],
    }


CASES = ["text", "data_uri_image", "http_image", "file_image", "two_images", "video", "system_multi_turn"]


@pytest.mark.parametrize("case", CASES)
def test_openai_sdk_matches_cli(client, tiny_moe, local_engine, media_dir, http_media, case):
    messages = _cases(media_dir, http_media)[case]
    expected = _expected(tiny_moe, local_engine, messages)   # the CLI fetches the same URLs and paths
    r = _chat(client, messages)
    assert r.choices[0].message.content == expected["text"]
    assert r.choices[0].finish_reason == expected["finish_reason"]
    assert r.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert r.usage.completion_tokens == len(expected["output_token_ids"])
    text, usage = _stream_text(client, messages)
    assert text == expected["text"] and usage.prompt_tokens == r.usage.prompt_tokens


def test_greedy_output_equals_transformers(client, tiny_moe):
    oracle = pytest.importorskip("oracle")
    import torch

    processor, model = oracle.load_reference(str(tiny_moe))
    img = make_image(300, 200, 1)
    messages = [{"role": "user", "content": [_img(data_uri(image_bytes(img))), {"type": "text", "text": "What?"}]}]
    ref_text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                                             tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[ref_text], images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    ref = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    r = _chat(client, messages)
    assert r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_tritonclient_grpc_stream_to_ensemble(server, tiny_moe, local_engine):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    img = make_image(300, 200, 1)
    b64 = base64.b64encode(image_bytes(img)).decode()
    messages = [{"role": "user", "content": "Describe the picture."}]
    expected = _expected(tiny_moe, local_engine, [{"role": "user", "content": [_img(b64), {"type": "text", "text": "Describe the picture."}]}])

    def inp(name, arr):
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        return t

    results = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer("qwen3vl", [
        inp("text_input", np.array([json.dumps({"messages": messages}).encode()], dtype=np.object_)),
        inp("image", np.array([b64.encode()], dtype=np.object_)),
        inp("stream", np.array([True])),
        inp("sampling_parameters", np.array([json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS}).encode()], dtype=np.object_)),
    ], request_id="grpc-1")
    text = ""
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        text += result.as_numpy("text_output")[0].decode()
        if result.as_numpy("finish_reason")[0]:
            break
    c.stop_stream()
    assert text == expected["text"]


def test_sixteen_concurrent_streams_with_mixed_media(client, tiny_moe, local_engine, media_dir, http_media):
    cases = _cases(media_dir, http_media)
    names = [CASES[i % len(CASES)] for i in range(16)]
    expected = {n: _expected(tiny_moe, local_engine, cases[n])["text"] for n in set(names)}
    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda n: _stream_text(client, cases[n])[0], names))
    assert texts == [expected[n] for n in names]


def _metric(server, name):
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_client_disconnect_cancels_and_frees_kv_blocks(server):
    before = _metric(server, "qwen3vl_requests_cancelled_total") or 0.0
    body = {"model": "tiny-moe", "messages": [{"role": "user", "content": "Talk forever."}], "stream": True,
            "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert _metric(server, "qwen3vl_kv_cache_usage") > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (_metric(server, "qwen3vl_requests_cancelled_total") or 0) > before and _metric(server, "qwen3vl_kv_cache_usage") == 0:
            break
        time.sleep(0.2)
    assert _metric(server, "qwen3vl_requests_cancelled_total") == before + 1
    assert _metric(server, "qwen3vl_kv_cache_usage") == 0.0
    assert _metric(server, "qwen3vl_num_running") == 0.0


def _post(server, body, raw=None):
    return httpx.post(f"{server.url}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)


def _msg(content):
    return {"model": "tiny-moe", "messages": [{"role": "user", "content": content}], "max_tokens": 4}


@pytest.mark.parametrize("name,body,status,message", [
    ("invalid_json", "{not json", 400, "not valid JSON"),
    ("missing_messages", {"model": "tiny-moe"}, 400, "'messages' is required"),
    ("unknown_model", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ("unsupported_part", _msg([{"type": "input_audio", "input_audio": {"data": "x"}}]), 400, "unsupported content part type"),
    ("corrupt_base64", _msg([_img("data:image/png;base64,%%%%")]), 400, "not valid base64"),
    ("not_an_image", _msg([_img(data_uri(b"plain text, not pixels"))]), 400, "not a decodable image"),
    ("url_not_answering", _msg([_img("http://127.0.0.1:9/nothing.png")]), 400, "could not fetch"),
    ("path_outside_allow_list", _msg([_img("file:///etc/hostname")]), 400, "under the server's allowed local media path"),
    ("prompt_too_long", _msg("word " * 1500), 400, f"does not fit the context of {MAX_MODEL_LEN} tokens"),
    ("max_tokens_zero", {**_msg("x"), "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
    ("negative_temperature", {**_msg("x"), "temperature": -1}, 400, "temperature must be in [0, 100]"),
    ("top_p_zero", {**_msg("x"), "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("top_p_above_one", {**_msg("x"), "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("n_two", {**_msg("x"), "n": 2}, 400, "'n' is not supported by this server yet"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_gets_clear_4xx(server, name, body, status, message, stream):
    if isinstance(body, dict) and stream:
        body = {**body, "stream": True}
    elif stream:
        pytest.skip("invalid JSON has no stream flag")
    r = _post(server, body, raw=body if isinstance(body, str) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_null_fields_mean_unset(server):
    """OpenAI clients send null for unset fields; the body is forwarded as it came, so preprocess
    must read null as unset too (max_tokens null: the default, not an error)."""
    body = {**_msg("Say hi."), "max_tokens": None, "temperature": None, "top_p": None, "stop": None, "seed": None}
    r = _post(server, {**body, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = _post(server, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_slow_media_times_out_alone(server, http_media, client):
    started = time.monotonic()
    r = _post(server, _msg([_img(f"{http_media}/slow.png")]))
    assert r.status_code == 400 and "per-request limit" in r.json()["error"]["message"]
    assert time.monotonic() - started < MEDIA_TIMEOUT_S + 1.5
    assert _chat(client, [{"role": "user", "content": "next"}]).choices[0].finish_reason in ("stop", "length")


def test_repeated_image_hits_the_vit_cache(server, client):
    def hits():
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        m = re.search(r'^qwen3vl_vit_cache_total\{[^}]*result="hit"[^}]*\} ([0-9.e+-]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    messages = [{"role": "user", "content": [_img(data_uri(image_bytes(make_image(180, 140, 31)))),
                                             {"type": "text", "text": "again"}]}]
    first = _chat(client, messages)
    before = hits()
    second = _chat(client, messages)
    assert hits() == before + 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_server_still_serves_after_errors(client):
    r = _chat(client, [{"role": "user", "content": "Still there?"}])
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-moe"]
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["video_decoder"] in ("decord", "pyav")


def test_prefix_cache_reported_in_usage(client):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 8},
                {"role": "user", "content": [_img(data_uri(image_bytes(make_image(256, 256, 21)))), {"type": "text", "text": "Hi"}]}]
    first = _chat(client, messages)
    second = _chat(client, messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert second.choices[0].message.content == first.choices[0].message.content


def test_client_cli_streams_over_grpc(server, tiny_moe, local_engine, tmp_path):
    import io
    from client.chat import build_messages, stream_chat

    img = tmp_path / "x.png"
    img.write_bytes(image_bytes(make_image(100, 80, 5)))
    messages = build_messages("What is it?", [str(img)])
    buf = io.StringIO()
    info = stream_chat(f"127.0.0.1:{server.grpc_port}", messages, {"temperature": 0, "max_tokens": MAX_TOKENS}, out=buf)
    expected = _expected(tiny_moe, local_engine, messages)
    assert buf.getvalue() == info["text"] == expected["text"]
    assert info["prompt_tokens"] == len(expected["prompt_token_ids"])


def test_http_generate_stream_example(server, tiny_moe, local_engine):
    import io
    from client.http_generate_stream import generate_stream

    messages = [{"role": "user", "content": "Hello over HTTP."}]
    text = generate_stream(server.triton_http, messages, {"temperature": 0, "max_tokens": MAX_TOKENS}, out=io.StringIO())
    assert text == _expected(tiny_moe, local_engine, messages)["text"]


def test_llm_alone_with_token_ids(server, local_engine):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    ids = local_engine.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    expected = local_engine.generate([ids], SamplingParams(temperature=0, max_tokens=8))[0]
    results = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    arr = np.array(ids, dtype=np.int64)
    t = grpcclient.InferInput("input_ids", list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    s = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    s.set_data_from_numpy(np.array([json.dumps({"temperature": 0, "max_tokens": 8}).encode()], dtype=np.object_))
    e = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
    e.set_data_from_numpy(np.array([True]))
    c.async_stream_infer("llm", [t, s, e], request_id="llm-direct")
    result, error = results.get(timeout=60)
    c.stop_stream()
    assert error is None, error
    assert result.as_numpy("text_output")[0].decode() == expected["text"]


def test_prometheus_metrics_cover_serving(server, client):
    _chat(client, [{"role": "user", "content": [_img(data_uri(image_bytes(make_image(90, 90, 41)))),
                                                {"type": "text", "text": "metrics"}]}])
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("openai_prompt_tokens_total", "openai_generation_tokens_total",
                 "openai_time_to_first_token_seconds_bucket", "openai_time_per_output_token_seconds_bucket",
                 "openai_e2e_request_latency_seconds_bucket", "qwen3vl_num_running", "qwen3vl_num_waiting",
                 "qwen3vl_kv_cache_usage", "qwen3vl_prefix_cache_queries_total", "qwen3vl_prefix_cache_hits_total",
                 "qwen3vl_vit_cache_total", "qwen3vl_media_processing_seconds_total", "qwen3vl_media_requests_total"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    prompt = float(re.search(r"^openai_prompt_tokens_total (\S+)$", text, re.M).group(1))
    assert prompt > 0


def _where(server, family):
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{family}\{{[^}}]*where="(\w+)"[^}}]*\}} ([0-9.e+-]+)$', text, re.M)}


def test_tensor_handoffs_are_counted_by_where_they_arrive(server, client):
    """On CPU pixels and visual features travel through host memory; the counters say so (on a
    GPU with the IPC and on-device flags, tests/test_server_gpu.py expects `gpu`)."""
    before = (_where(server, "qwen3vl_vit_pixels_total"), _where(server, "qwen3vl_llm_visual_features_total"))
    _chat(client, [{"role": "user", "content": [_img(data_uri(image_bytes(make_image(80, 100, 43)))),
                                                {"type": "text", "text": "where"}]}])
    after = (_where(server, "qwen3vl_vit_pixels_total"), _where(server, "qwen3vl_llm_visual_features_total"))
    for b, a in zip(before, after):
        assert a["host"] == b.get("host", 0) + 1 and a["gpu"] == b.get("gpu", 0) == 0
