"""End to end against a real tritonserver (started once for the module) and the OpenAI adapter."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import functools
import http.server
import json
import os
import queue
import re
import threading
import time
from unittest import mock

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
TRICKLE_ENDED: dict[str, float] = {}


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
            if self.path.startswith("/trickle"):       # a body that never ends; when did its reader go?
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for _ in range(400):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
                TRICKLE_ENDED[self.path] = time.monotonic()
                return
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
                       "mm_max_concurrent_calls": "4", "resize_on_vit": "true",     # images reach the vit unresized,
                       "decode_jpeg_on_vit": "true"},        # JPEGs undecoded (the vit decodes them on its host)
        "vit": {**common, "vlm_cache_size_mb": "64"},
        "llm": {**common, "max_model_len": str(MAX_MODEL_LEN), "max_num_seqs": "16"},
    })
    with mock.patch.dict(os.environ, {"QWEN3VL_STAGE_TIMING": "1"}):      # the models' stage lines in the log
        srv = start_server(repo, root, ["--model-path", str(tiny_moe), "--allowed-local-media-path", str(media_dir),
                                        "--enable-cache-report",
                                        "--allow-private-media-urls", "--mm-per-request-timeout", str(MEDIA_TIMEOUT_S),
                                        "--mm-max-concurrent-calls", "4", "--max-request-body-mb", "4"])
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
    img = make_image(300, 200, 1)
    b64 = base64.b64encode(image_bytes(img)).decode()
    messages = [{"role": "user", "content": "Describe the picture."}]
    expected = _expected(tiny_moe, local_engine, [{"role": "user", "content": [_img(b64), {"type": "text", "text": "Describe the picture."}]}])
    text = _stream_ensemble(
        server, "grpc-1", text_input=np.array([json.dumps({"messages": messages}).encode()], dtype=np.object_),
        image=np.array([b64.encode()], dtype=np.object_), stream=np.array([True]),
        sampling_parameters=np.array([json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS}).encode()], dtype=np.object_))
    assert text == expected["text"]


def test_tritonclient_gets_logprobs_from_the_ensemble(server, tiny_moe, local_engine):
    """sampling_parameters {"logprobs": K}: the `logprobs` output carries each token's id, logprob
    and top K, in order, across the stream's responses (what the adapter turns into OpenAI's)."""
    messages = [{"role": "user", "content": "Describe the picture."}]
    expected = _expected(tiny_moe, local_engine, messages)
    logprobs: list = []
    text = _stream_ensemble(
        server, "grpc-lp", text_input=np.array([json.dumps({"messages": messages}).encode()], dtype=np.object_),
        stream=np.array([True]), logprobs_out=logprobs,
        sampling_parameters=np.array([json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": 2}).encode()],
                                     dtype=np.object_))
    assert text == expected["text"]
    assert [e[0] for e in logprobs] == expected["output_token_ids"]
    assert all(e[1] <= 0 and len(e[2]) == 2 and e[2][0][0] == e[0] for e in logprobs)    # greedy: the top one


def _stream_ensemble(server, request_id: str, expect_error: bool = False, logprobs_out: list | None = None,
                     **arrays) -> str:
    """One streamed request to the `qwen3vl` ensemble over tritonclient gRPC -> its whole text
    (or, with `expect_error`, the error's message); `logprobs_out` collects the logprobs output."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        inputs.append(t)
    results = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer("qwen3vl", inputs, request_id=request_id)
    text = ""
    while True:
        result, error = results.get(timeout=120)
        if expect_error:
            assert error is not None
            c.stop_stream()
            return error.message()
        assert error is None, error
        text += result.as_numpy("text_output")[0].decode()
        lp = result.as_numpy("logprobs")
        if logprobs_out is not None and lp is not None and lp.size:
            logprobs_out += json.loads(lp.reshape(-1)[0])
        if result.as_numpy("finish_reason")[0]:
            break
    c.stop_stream()
    return text


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
    ("n_too_many", {**_msg("x"), "n": 17}, 400, "'n' must be an integer from 1 to 16"),
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


def test_stage_lines_name_the_vits_replica_and_path(server, client):
    """QWEN3VL_STAGE_TIMING=1: each vit call's log line carries its timings and, per replica, the
    device and how it ran (on a CPU without graphs: eager), the lead for cold first requests; the
    preprocess and llm models log theirs."""
    image = make_image(97, 61, 4)                 # a size no other test sends: a miss in the vit's cache
    _chat(client, [{"role": "user", "content": [_img(data_uri(image_bytes(image))), {"type": "text", "text": "hi"}]}])
    deadline = time.monotonic() + 10               # Triton writes its log as it goes
    while True:
        log = (server.log_dir / "tritonserver.log").read_text()
        lines = [line for line in log.splitlines() if "stage vit" in line and "queue=" in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert lines and all(re.search(r"paths=cpu:eager\b", line) for line in lines), lines[-3:]
    assert any("stage preprocess" in line for line in log.splitlines())
    # the llm's: its execute's parse and, at the first output, the time since execute began
    llm = [re.search(r"stage llm \S*: parse=([\d.]+) total=([\d.]+)", line) for line in log.splitlines()]
    llm = [m for m in llm if m]
    assert llm and all(float(m[1]) <= float(m[2]) for m in llm), llm[-3:]


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


def test_unset_sampling_fields_take_the_checkpoints_defaults(client, tiny_moe, local_engine):
    """--sampling-defaults model (the launcher's default): a seeded request that sets no temperature
    draws as the checkpoint's generation_config.json says (0.7 / 0.8 / 20), not as temperature 1
    over the whole vocabulary (seeded draws do not depend on the batch, so the local engine's agree)."""
    messages = [{"role": "user", "content": "Name a colour."}]
    served = client.chat.completions.create(model="tiny-moe", messages=messages, seed=5, max_tokens=8,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    request = {"messages": messages, "seed": 5, "max_tokens": 8, "ignore_eos": True}
    assert local_engine.sampling_defaults["top_k"] == 20
    assert served == generate.run(str(tiny_moe), request, engine=local_engine)["text"]
    plain = generate.run(str(tiny_moe), {**request, "temperature": 1.0, "top_p": 1.0, "top_k": 0}, engine=local_engine)
    assert served != plain["text"]


def test_an_empty_text_input_is_named_as_such(server):
    """A direct Triton client's empty prompt: the error says so (it was llm's 'input_ids is
    required', an input the client never sends to the ensemble)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([b""], dtype=np.object_))
    c.async_stream_infer("qwen3vl", [t], request_id="empty")
    result, error = results.get(timeout=60)
    c.stop_stream()
    assert result is None and isinstance(error, InferenceServerException)
    assert "invalid request: text_input is empty" in str(error)


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


def test_vit_alone_refuses_rows_that_do_not_match_the_grids(server):
    """The vit model called directly (it is in the repository like any model): pixel rows that
    do not match grid_thw are the caller's mistake, answered as such, and the model serves on.
    So are unresized images (source_sizes) whose pixels or grids do not add up."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def call(rows, width, grid):
        pv = grpcclient.InferInput("pixel_values", [rows, width], "UINT8")
        pv.set_data_from_numpy(np.zeros((rows, width), np.uint8))
        g = grpcclient.InferInput("grid_thw", [1, 3], "INT64")
        g.set_data_from_numpy(np.array([grid], np.int64))
        return c.infer("vit", [pv, g])

    with pytest.raises(InferenceServerException, match="has 5 rows; grid_thw's items have 16 patches"):
        call(5, 1536, (1, 4, 4))
    with pytest.raises(InferenceServerException, match="rows of 100 values"):
        call(16, 100, (1, 4, 4))
    full, single = call(16, 1536, (1, 4, 4)), call(16, 768, (1, 4, 4))      # a zero image, either way
    assert np.array_equal(full.as_numpy("visual_embeds"), single.as_numpy("visual_embeds"))
    assert full.as_numpy("visual_embeds").shape[0] == 4

    def call_raw(height, width, grid, pixels=None):
        pixels = np.zeros((height * width, 3), np.uint8) if pixels is None else pixels
        pv = grpcclient.InferInput("pixel_values", list(pixels.shape), "UINT8")
        pv.set_data_from_numpy(pixels)
        g = grpcclient.InferInput("grid_thw", [1, 3], "INT64")
        g.set_data_from_numpy(np.array([grid], np.int64))
        s = grpcclient.InferInput("source_sizes", [1, 2], "INT64")
        s.set_data_from_numpy(np.array([[height, width]], np.int64))
        return c.infer("vit", [pv, g, s])

    # an unresized zero image (resized here) is the same zero image's rows
    assert np.array_equal(call_raw(30, 50, (1, 4, 4)).as_numpy("visual_embeds"), full.as_numpy("visual_embeds"))
    with pytest.raises(InferenceServerException, match="pixel_values has 1500 pixels; source_sizes describe 1501"):
        call_raw(19, 79, (1, 4, 4), np.zeros((1500, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="past the server's"):
        call_raw(1, 1, (1, 4096, 4096))


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


# -- hostile clients ---------------------------------------------------------------------------

def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 3751 * 8)) + chunk(b"IEND", b""))


HOSTILE = [
    # (name, body or raw bytes, expected status, expected message part)
    ("seed_past_64_bits", {**_msg("x"), "seed": 2**64}, 400, "seed must be an integer in"),
    ("repetition_penalty_tiny", {**_msg("x"), "repetition_penalty": 1e-300}, 400, "repetition_penalty must be in"),
    ("stop_list_huge", {**_msg("x"), "stop": ["a"] * 100}, 400, "stop must be"),
    ("lone_surrogate", "{\"model\": \"tiny-moe\", \"messages\": [{\"role\": \"user\", \"content\": \"hi \\ud800\"}]}",
     400, "not valid Unicode"),
    ("decompression_bomb", _msg([_img(data_uri(_bomb_png()))]), 400, "pixel limit"),
    ("damaged_video", _msg([{"type": "video_url", "video_url": {"url": data_uri(b"\x00\x00\x00\x18ftypmp42" + bytes(4000),
                                                                               "video/mp4")}}]),
     400, "not a decodable video"),
    ("closed_port_url", _msg([_img("http://127.0.0.1:9/x.png")]), 400, "could not fetch media"),
    ("too_many_images", _msg([_img(data_uri(image_bytes(make_image(8, 8, 1))))] * 17), 400, "at most 16"),
    ("tools_nameless", {**_msg("x"), "tools": [{"type": "function", "function": {"description": "f"}}]}, 400,
     "tools[0] must be"),
    ("schema_that_does_not_compile", {**_msg("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "structured_output does not compile"),
    ("grammar_past_llguidance_limits", {**_msg("x"), "ebnf": 'root ::= "a" root', "max_tokens": 40}, 400,
     "structured_output stopped after"),
    ("schema_that_matches_nothing", {**_msg("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}}, 400,
     "structured_output admits no output"),
    ("response_format_unknown", {**_msg("x"), "response_format": {"type": "xml"}}, 400, "response_format type must be"),
    ("top_logprobs_past_20", {**_msg("x"), "logprobs": True, "top_logprobs": 99}, 400,
     "'top_logprobs' must be an integer from 0 to 20"),
    ("logit_bias_past_100", {**_msg("x"), "logit_bias": {"1": 500}}, 400, "logit_bias must map"),
    ("logit_bias_past_the_vocabulary", {**_msg("x"), "logit_bias": {"999999": 5}}, 400,
     "logit_bias token ids must be in"),
    ("image_tokens_past_context", _msg([_img(data_uri(image_bytes(make_image(1400, 1400, 2), "JPEG"), "image/jpeg"))]), 400,
     f"does not fit the context of {MAX_MODEL_LEN} tokens"),
]


@pytest.mark.parametrize("name,body,status,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_clear_4xx(server, name, body, status, message):
    r = _post(server, body if isinstance(body, dict) else None, raw=body if isinstance(body, str) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]["message"]
    assert message in err
    for leak in ("Traceback", "/work/", ".py", "object at 0x", "BytesIO"):
        assert leak not in err


def test_a_grammar_that_gives_out_mid_stream_ends_it_with_the_reason(server):
    """Streaming, the 200 has gone out before llguidance's limits stop the grammar: the stream ends
    with an error event that says why (the client's), not an internal error; the server serves on."""
    body = {**_msg("x"), "ebnf": 'root ::= [0-9]{6} a\na ::= "a" a', "max_tokens": 40, "stream": True}
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    digits = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
    assert re.fullmatch(r"[0-9]{6}", digits)                 # the grammar's tokens came, then its end
    assert "structured_output stopped after 6 tokens" in events[-1]["error"]["message"]
    assert events[-1]["error"]["type"] == "invalid_request_error"
    assert _chat_ok(server)


def test_prompt_past_the_context_is_refused_before_the_vit(server):
    """The exact prompt length (text + merged patches of the resized image) is known in preprocess:
    an image that cannot fit never reaches the ViT."""
    before = _where(server, "qwen3vl_vit_pixels_total").get("host", 0)
    r = _post(server, _msg([_img(data_uri(image_bytes(make_image(1400, 1400, 3), "JPEG"), "image/jpeg"))]))
    assert r.status_code == 400 and "does not fit the context" in r.json()["error"]["message"]
    assert _where(server, "qwen3vl_vit_pixels_total").get("host", 0) == before


def test_extreme_but_valid_values_are_served(server):
    for extra in ({"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0}, {"top_k": 2**63, "temperature": 0.7},
                  {"max_tokens": 3}):
        r = _post(server, {**_msg("Hello there."), **extra})
        assert r.status_code == 200, (extra, r.text)
    tiny = _img(data_uri(image_bytes(make_image(32, 32, 4))))
    tiny["image_url"].update(min_pixels=10**12, max_pixels=10**12)      # can only lower the server's limits
    r = _post(server, _msg([tiny, {"type": "text", "text": "what?"}]))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 200


def test_logit_bias_forces_and_bans_tokens_when_served(client, local_engine):
    """OpenAI's logit_bias through the adapter and Triton: +100 on a token makes the random model
    write only it; -100 on greedy's first token makes another come first."""
    msgs = [{"role": "user", "content": "Say something."}]
    tok = local_engine.tokenizer
    word = tok.encode(" yes")[0]
    forced = client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=3, temperature=0,
                                            logit_bias={str(word): 100})
    assert forced.choices[0].message.content == tok.decode([word] * 3)
    plain = client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=1, temperature=0, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    banned = client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                            logit_bias={str(tok.encode(first)[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first


def test_request_body_limit_is_413(server):
    big = json.dumps(_msg("x" * (5 * 2**20)))
    r = _post(server, None, raw=big)
    assert r.status_code == 413 and "byte limit" in r.json()["error"]["message"]

    def chunks():                         # no Content-Length: cut off while it streams in
        yield b'{"model": "tiny-moe", "messages": [{"role": "user", "content": "'
        for _ in range(6):
            yield b"y" * 2**20
        yield b'"}]}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_genai_perf_request_shape_through_tritonclient(server, tiny_moe, local_engine):
    """genai-perf --endpoint-type kserve --backend vllm: every sampling value a string, and a raw
    base64 JPEG in `image` (which starts with /9j/, like a path)."""
    jpeg = image_bytes(make_image(64, 48, 6), "JPEG")
    b64 = base64.b64encode(jpeg).decode()
    assert b64.startswith("/9j/")
    sampling = {"max_tokens": str(MAX_TOKENS), "temperature": "0", "ignore_eos": "false", "top_k": "1"}
    text = _stream_ensemble(
        server, "genai-perf-1", text_input=np.array([b"Describe the picture."], dtype=np.object_),
        image=np.array([b64.encode()], dtype=np.object_), stream=np.array([True]),
        exclude_input_in_output=np.array([True]),
        sampling_parameters=np.array([json.dumps(sampling).encode()], dtype=np.object_))
    expected = local_engine.generate([_plain_prompt(tiny_moe, local_engine, jpeg, "Describe the picture.")],
                                     SamplingParams(temperature=0, max_tokens=MAX_TOKENS, top_k=1))[0]["text"]
    assert text == expected


def _plain_prompt(tiny_moe, engine, image: bytes, text: str):
    """What preprocess builds for a plain prompt with one `image`: a vision block ahead of the text."""
    from qwen3vl_backend.processing.chat import MediaRef
    from qwen3vl_backend.processing.processor import IMAGE_PAD, VISION_END, VISION_START, Processor

    proc = Processor(str(tiny_moe), engine.tokenizer)
    media = proc.load_all([MediaRef("image", base64.b64encode(image).decode())])
    return proc.build_prompt(f"{VISION_START}{IMAGE_PAD}{VISION_END}{text}", media)


def test_llm_refuses_ids_outside_the_vocabulary(server, local_engine):
    import tritonclient.grpc as grpcclient

    results = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    for ids in ([1, 2, local_engine.vocab_size + 7], [5, -3]):
        arr = np.array(ids, dtype=np.int64)
        t = grpcclient.InferInput("input_ids", list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        c.async_stream_infer("llm", [t], request_id="bad-ids")
        result, error = results.get(timeout=60)
        assert error is not None and "prompt token ids must be in [0," in error.message()
    c.stop_stream()
    assert _chat_ok(server)


def _chat_ok(server) -> bool:
    r = _post(server, {**_msg("Are you fine?"), "temperature": 0})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _sse_text(server, body) -> str:
    text = ""
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{server.url}/v1/chat/completions",
                                                  json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"]:
                    text += event["choices"][0]["delta"].get("content") or ""
    return text


def _leave_midway(server, body, streaming: bool) -> str:
    body = {**body, "max_tokens": 700, "ignore_eos": True}
    if streaming:
        with httpx.Client(timeout=120) as h, h.stream("POST", f"{server.url}/v1/chat/completions",
                                                      json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        return "left"
    try:
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(1.5))
    except httpx.TimeoutException:
        return "left"
    return "finished"


def test_generate_requests_whose_clients_leave_end_in_the_engine(server):
    """SGLang's /generate, streamed or not: a client that leaves mid-answer (the whole one still
    waiting, the streamed one after a few events) has its requests, n of them, cancelled: the
    engine ends empty."""
    body = {"text": "<|im_start|>user\nTell me a long story.<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"max_new_tokens": MAX_MODEL_LEN - 40, "ignore_eos": True, "n": 2, "temperature": 1.0}}
    r = httpx.post(f"{server.url}/generate", json={**body, "sampling_params": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
    cancelled = _metric(server, "qwen3vl_requests_cancelled_total") or 0.0
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/generate", json=body, timeout=httpx.Timeout(1.5))
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{server.url}/generate", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _metric(server, "qwen3vl_requests_cancelled_total") >= cancelled + 4 and _metric(
                server, "qwen3vl_num_running") == 0:
            break
        time.sleep(0.5)
    assert _metric(server, "qwen3vl_requests_cancelled_total") == cancelled + 4      # two requests, n=2 each
    assert _metric(server, "qwen3vl_num_running") == 0 and _metric(server, "qwen3vl_num_waiting") == 0


def test_load_with_disconnects_and_hostile_requests(server, http_media):
    """32 honest requests (half streaming), a fifth of them abandoned mid-way, every hostile
    request above mixed in: each honest request that stayed gets the text it gets alone, and the
    engine ends empty."""
    topics = ["the sea", "a cat", "rain", "stars", "bread", "trains", "snow", "jazz"]
    honest = {t: {**_msg(f"Tell me about {t}."), "temperature": 0, "max_tokens": MAX_TOKENS} for t in topics}
    alone = {t: _post(server, b).json()["choices"][0]["message"]["content"] for t, b in honest.items()}
    jobs = []
    for i in range(32):
        topic, streaming = topics[i % len(topics)], i % 2 == 0
        if i % 5 == 0:
            jobs.append(("leave", topic, lambda b=honest[topic], s=streaming: _leave_midway(server, b, s)))
        elif streaming:
            jobs.append(("stay", topic, lambda b=honest[topic]: _sse_text(server, b)))
        else:
            jobs.append(("stay", topic, lambda b=honest[topic]: _post(server, b).json()["choices"][0]["message"]["content"]))
    # under this load a hostile request may also meet the media time limit first: any 4xx is right
    for name, body, status, _ in HOSTILE:
        jobs.append(("hostile", name, lambda b=body, st=status: (lambda r: r.status_code == st or r.text)(_post(
            server, b if isinstance(b, dict) else None, raw=b if isinstance(b, str) else None))))
    jobs.append(("hostile", "slow_media", lambda: _post(server, _msg([_img(f"{http_media}/slow.png")])).status_code == 400))
    order = list(range(len(jobs)))
    import random
    random.Random(7).shuffle(order)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {i: pool.submit(jobs[i][2]) for i in order}
        results = {i: f.result(timeout=300) for i, f in futures.items()}
    left = sum(1 for kind, _, _ in jobs if kind == "leave")
    assert left >= 6
    for i, (kind, what, _) in enumerate(jobs):
        if kind == "stay":
            assert results[i] == alone[what], what
        elif kind == "hostile":
            assert results[i] is True, (what, results[i])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(_metric(server, m) == 0 for m in ("qwen3vl_kv_cache_usage", "qwen3vl_num_running", "qwen3vl_num_waiting")):
            break
        time.sleep(0.3)
    for m in ("qwen3vl_kv_cache_usage", "qwen3vl_num_running", "qwen3vl_num_waiting"):
        assert _metric(server, m) == 0, m
    assert _chat_ok(server)


def test_a_fetch_stops_when_its_client_leaves(server, http_media):
    """The adapter fetches remote media; a client that gives up ends the fetch at once (its
    socket is shut), not at the fetch deadline or the per-request media limit."""
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", json=_msg([_img(f"{http_media}/trickle-gone.png")]),
                   timeout=0.3)
    deadline = time.monotonic() + 10
    while "/trickle-gone.png" not in TRICKLE_ENDED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert TRICKLE_ENDED["/trickle-gone.png"] - started < MEDIA_TIMEOUT_S - 0.3
    assert _chat_ok(server)


def test_text_never_waits_behind_media(server, http_media):
    """Direct Triton clients hold the preprocess instance with media that uses its whole time
    limit; a text-only chat through the adapter goes to `llm` directly and is answered meanwhile."""
    blocked = {}

    def block(i):
        blocked[i] = _stream_ensemble(server, f"block-{i}", True, text_input=np.array([b"Look."], dtype=np.object_),
                                      image=np.array([f"{http_media}/slow.png".encode()], dtype=np.object_))
    threads = [threading.Thread(target=block, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    r = _post(server, {**_msg("Quick?"), "temperature": 0})
    took = time.monotonic() - started
    still_blocked = len(blocked) < 3
    for t in threads:
        t.join(60)
    assert r.status_code == 200 and took < 1.5 and still_blocked, (r.status_code, took)
    assert all("per-request limit" in m for m in blocked.values())


def test_n_seeded_choices_reproduce_differ_and_share_one_prefill(client, server):
    """n=3 through Triton: each choice its own seeded stream (seed + index); choices 1 and 2 start
    once choice 0 has its first token, so their prompt comes from the prefix cache."""
    prompt = "Name a colour that is " + "very " * 40 + "bright."
    kw = dict(model="tiny-moe", messages=[{"role": "user", "content": prompt}], n=3, seed=7, temperature=1.0,
              max_tokens=8)
    hits = _metric(server, "qwen3vl_prefix_cache_hits_total") or 0
    a = client.chat.completions.create(**kw)
    shared = (_metric(server, "qwen3vl_prefix_cache_hits_total") or 0) - hits
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3 and a.usage.completion_tokens == 24
    # two choices each reused the prompt's full blocks (all but the last partial block of 16)
    assert shared >= 2 * (a.usage.prompt_tokens // 16 - 1) * 16 > 0


def test_tools_and_template_kwargs_reach_the_model_through_both_paths(client, media_dir):
    """The tool list is rendered into the prompt on the text path (adapter) and the media path
    (preprocess) alike: the prompt grows by the same number of tokens."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    img = _img(data_uri(image_bytes(make_image(64, 64, 5))))
    for content in ("Weather in Paris?", [img, {"type": "text", "text": "Weather here?"}]):
        msgs = [{"role": "user", "content": content}]
        plain = _chat(client, msgs)
        with_tools = _chat(client, msgs, tools=tools)
        hidden = _chat(client, msgs, tools=tools, tool_choice="none")
        assert with_tools.usage.prompt_tokens - plain.usage.prompt_tokens > 40
        assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_endpoint_continues_token_ids_as_chat_does(client, tiny_moe, local_engine):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    want = _expected(tiny_moe, local_engine, messages)
    out = client.completions.create(model="tiny-moe", prompt=want["prompt_token_ids"], temperature=0,
                                    max_tokens=MAX_TOKENS)
    assert out.choices[0].text == want["text"] and out.usage.prompt_tokens == len(want["prompt_token_ids"])


def test_logprobs_are_the_engines_log_softmax(client, tiny_moe, local_engine):
    """Through Triton: each token's logprob and its top alternatives equal the model's own
    log-softmax at that position (raw: before temperature and penalties)."""
    import torch

    from qwen3vl_backend.processing.processor import ProcessedPrompt

    messages = [{"role": "user", "content": "Tell me about the sea."}]
    want = _expected(tiny_moe, local_engine, messages)
    out = _chat(client, messages, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(want["output_token_ids"]) == MAX_TOKENS
    ids = want["prompt_token_ids"] + want["output_token_ids"]
    ref = torch.log_softmax(local_engine.prompt_logits(
        ProcessedPrompt(ids, [], torch.arange(len(ids)).expand(3, -1), 0)).float(), -1)
    start = len(want["prompt_token_ids"]) - 1
    for i, (entry, token) in enumerate(zip(content, want["output_token_ids"])):
        row = ref[start + i]
        assert abs(entry.logprob - float(row[token])) < 1e-4
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1,
                                                                                          "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


def _valid_weather_args(args: dict) -> bool:
    return (set(args) == {"city", "days"} and isinstance(args["city"], str) and len(args["city"]) <= 12
            and isinstance(args["days"], int) and 1 <= args["days"] <= 7)


def test_forced_tool_call_and_strict_schema_hold_for_a_random_model(client):
    """The tiny model is random; constrained decoding still makes tool_choice required give a call
    that parses and validates, the same call streamed (deltas reassembled), and a strict
    json_schema answer that validates."""
    msgs = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    kw = dict(tools=[WEATHER_TOOL], tool_choice="required", temperature=1.0, seed=11, max_tokens=80)
    whole = client.chat.completions.create(model="tiny-moe", messages=msgs, **kw)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = whole.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" and _valid_weather_args(json.loads(c.function.arguments))
                         for c in calls)
    streamed: dict = {}
    for ch in client.chat.completions.create(model="tiny-moe", messages=msgs, stream=True, **kw):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            entry = streamed.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]

    schema = WEATHER_TOOL["function"]["parameters"]
    for seed in (1, 2, 3):
        out = client.chat.completions.create(model="tiny-moe", messages=msgs, temperature=1.0, seed=seed, max_tokens=80,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "weather", "schema": schema, "strict": True}})
        assert out.choices[0].finish_reason == "stop" and _valid_weather_args(json.loads(out.choices[0].message.content))


def test_vllm_and_sglang_constraints_hold_for_a_random_model(client):
    """vLLM's and SGLang's own constraint fields, served: an EBNF (GBNF) grammar, a choice and a
    regex hold on chat and on completions for the random tiny model, which free would write
    neither; a GBNF grammar that does not parse is the client's 400."""
    import openai

    msgs = [{"role": "user", "content": "Pick."}]
    for seed in (1, 2):
        kw = dict(model="tiny-moe", temperature=1.0, seed=seed, max_tokens=24)
        sku = client.chat.completions.create(messages=msgs, **kw, extra_body={
            "ebnf": 'root ::= [0-9]{3} "-" word\nword ::= "red" | "blue"'}).choices[0]
        pick = client.chat.completions.create(messages=msgs, **kw, extra_body={
            "guided_choice": ["left", "right"]}).choices[0]
        code = client.completions.create(prompt="Code:", **kw, extra_body={
            "structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}}).choices[0]
        assert re.fullmatch(r"[0-9]{3}-(red|blue)", sku.message.content) and sku.finish_reason == "stop"
        assert pick.message.content in ("left", "right") and pick.finish_reason == "stop"
        assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", code.text) and code.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="structured_output grammar does not compile"):
        client.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=4, extra_body={"ebnf": "root ::= ("})


def test_continue_final_message_served_on_both_paths(client, local_engine, tiny_moe):
    """vLLM's continue_final_message (with add_generation_prompt false): the model goes on with the
    assistant's prefilled text. Text-only chats are rendered by the adapter: the served greedy
    answer is the local engine's on the rendered prompt. Chats with media are rendered by
    preprocess: the prompt grows by exactly the prefill's tokens."""
    from qwen3vl_backend.processing.chat import load_chat_template, render_chat

    template, tok = load_chat_template(tiny_moe), local_engine.tokenizer
    prefill = {"role": "assistant", "content": "Sure. The sky over the"}
    chat = [{"role": "user", "content": "Tell me a story."}, prefill]
    opened = {"continue_final_message": True, "add_generation_prompt": False}
    rendered, _ = render_chat(template, chat, **opened)
    assert rendered.endswith("<|im_start|>assistant\nSure. The sky over the")
    expected = local_engine.generate([tok.encode(rendered)], SamplingParams(temperature=0, max_tokens=8))[0]
    out = client.chat.completions.create(model="tiny-moe", messages=chat, temperature=0, max_tokens=8,
                                         extra_body=opened)
    assert out.choices[0].message.content == expected["text"]

    image = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(64, 64, 5)))}}
    asked = [{"role": "user", "content": [image, {"type": "text", "text": "Tell me a story."}]}]
    plain = client.chat.completions.create(model="tiny-moe", messages=asked, temperature=0, max_tokens=2)
    more = client.chat.completions.create(model="tiny-moe", messages=[*asked, prefill], temperature=0, max_tokens=2,
                                          extra_body=opened)
    grow = len(tok.encode(rendered)) - len(tok.encode(render_chat(template, chat[:1])[0]))
    assert grow > 3 and more.usage.prompt_tokens - plain.usage.prompt_tokens == grow


def test_sglang_generate_served_as_the_chat_endpoint_answers(server, client, local_engine):
    """SGLang's /generate with the template applied by the caller answers what the chat endpoint
    answers for the same chat: a text prompt (tokenized by the adapter, to llm) and one with an
    image (the ensemble's `image` input), greedy, same text and prompt tokens; streamed, the
    events carry the text so far and end with [DONE]."""
    tok = local_engine.tokenizer
    image = data_uri(image_bytes(make_image(64, 48, 3)))
    greedy = {"temperature": 0, "max_new_tokens": 6}
    for content, prompt, data in (
            ("What is it?", "<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n", None),
            ([_img(image), {"type": "text", "text": "What is it?"}],
             "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
             "<|im_start|>assistant\n", image)):
        chat = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=6)
        r = httpx.post(f"{server.url}/generate", json={"text": prompt, "image_data": data, "sampling_params": greedy},
                       timeout=60)
        assert r.status_code == 200, r.text
        meta = r.json()["meta_info"]
        assert r.json()["text"] == chat.choices[0].message.content
        assert meta["prompt_tokens"] == chat.usage.prompt_tokens
        assert meta["completion_tokens"] == chat.usage.completion_tokens
    assert chat.usage.prompt_tokens > len(tok.encode(prompt))            # the image's pads were expanded
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{server.url}/generate", json={
            "text": prompt, "image_data": data, "sampling_params": greedy, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert events[-1] == "[DONE]" and texts[-1] == chat.choices[0].message.content
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_structured_output_through_tritonclient_on_the_ensemble(server):
    """Triton users set it in sampling_parameters, as any other sampling field."""
    schema = WEATHER_TOOL["function"]["parameters"]
    text = _stream_ensemble(
        server, "grpc-structured", stream=np.array([True]),
        text_input=np.array([json.dumps({"messages": [{"role": "user", "content": "JSON please."}]}).encode()],
                            dtype=np.object_),
        sampling_parameters=np.array([json.dumps({"temperature": 1.0, "seed": 5, "max_tokens": 80,
                                                  "structured_output": {"json_schema": schema}}).encode()],
                                     dtype=np.object_))
    assert _valid_weather_args(json.loads(text))


def test_completions_echo_with_logprobs_scores_the_prompt(client, tiny_moe, local_engine):
    """echo + logprobs (how evaluation harnesses score a text): the prompt's tokens come back with
    the model's logprob of each given the ones before (the first has none), then the completion's."""
    import torch

    from qwen3vl_backend.processing.processor import ProcessedPrompt

    ids = local_engine.tokenizer.encode("The sea is wide and the sky is blue.")
    out = client.completions.create(model="tiny-moe", prompt=ids, echo=True, logprobs=2, max_tokens=3, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(local_engine.prompt_logits(
        ProcessedPrompt(ids, [], torch.arange(len(ids)).expand(3, -1), 0)).float(), -1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-4 and len(lp.top_logprobs[i]) == 2
    assert out.choices[0].text.startswith(local_engine.tokenizer.decode(ids))


def test_media_input_through_the_ensemble(server):
    """tritonclient straight to the ensemble: a chat naming the `media` input's entry answers as
    the same chat with the data URI inline; a name past the entries is refused with the reason."""
    uri = data_uri(image_bytes(make_image(96, 64, 5)))
    sampling = np.array([json.dumps({"temperature": 0, "max_tokens": 6}).encode()], dtype=np.object_)

    def chat(url):
        return np.array([json.dumps({"messages": [{"role": "user", "content": [
            _img(url), {"type": "text", "text": "What is it?"}]}]}).encode()], dtype=np.object_)

    inline = _stream_ensemble(server, "media-inline", text_input=chat(uri), sampling_parameters=sampling,
                              stream=np.array([True]))
    named = _stream_ensemble(server, "media-named", text_input=chat("media-input:0"), sampling_parameters=sampling,
                             stream=np.array([True]), media=np.array([uri.encode()], dtype=np.object_))
    assert named == inline and inline
    error = _stream_ensemble(server, "media-bad", expect_error=True, text_input=chat("media-input:1"),
                             sampling_parameters=sampling, stream=np.array([True]),
                             media=np.array([uri.encode()], dtype=np.object_))
    assert "names no entry of the media input" in error


def _adapter_metric(server, name):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_large_images_reach_triton_through_shared_memory(server, client, tiny_moe, local_engine):
    """A photo-sized image (a ~1 MB data URI) goes to Triton through the adapter's shared-memory
    region (openai_frontend/shm_inputs.py) and gives the answer the engine gives; its slice is
    back once the answer is. Triton losing the region (as when it restarts: unregistered here) costs
    the next request nothing: it registers a new one and goes again."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(41)
    from PIL import Image

    big = image_bytes(Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)))
    assert len(big) > 500_000
    messages = [{"role": "user", "content": [_img(data_uri(big)), {"type": "text", "text": "what is this"}]}]
    want = _expected(tiny_moe, local_engine, messages)["text"]
    before = _adapter_metric(server, "openai_triton_shm_inputs") or 0.0
    assert _chat(client, messages).choices[0].message.content == want
    assert _adapter_metric(server, "openai_triton_shm_inputs") == before + 1
    assert _adapter_metric(server, "openai_triton_shm_bytes_in_use") == 0
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    regions = triton.get_system_shared_memory_status(as_json=True).get("regions", {})
    assert any(name.startswith("qwen3vl_inputs_") for name in regions), regions
    triton.unregister_system_shared_memory()          # every region: what a restarted Triton has
    text, _ = _stream_text(client, messages)
    assert text == want
    # placed twice: refused for the lost region, then through the new one
    assert _adapter_metric(server, "openai_triton_shm_inputs") == before + 3
    regions = triton.get_system_shared_memory_status(as_json=True).get("regions", {})
    assert any(name.startswith("qwen3vl_inputs_") for name in regions), regions
    # a small one rides in the gRPC message
    small = [{"role": "user", "content": [_img(data_uri(image_bytes(make_image(32, 32, 3)))),
                                          {"type": "text", "text": "small"}]}]
    _chat(client, small)
    assert _adapter_metric(server, "openai_triton_shm_inputs") == before + 3
    assert _adapter_metric(server, "openai_triton_shm_bytes_in_use") == 0
