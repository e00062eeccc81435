"""The Triton `llm` model's request reading and response sending (serving/llm_requests.py), run
against a fake `pb_utils`: what only a live tritonserver exercised before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen3vl_backend.engine.llm_engine import RequestOutput
from qwen3vl_backend.errors import RequestError
from qwen3vl_backend.serving.engine_loop import EngineClientError, EngineRequestError
from qwen3vl_backend.serving.llm_requests import FINAL, ResponseStream, parse_request
from qwen3vl_backend.serving.triton_params import CLIENT_ERROR_PREFIX


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True

    def to_dlpack(self):
        return torch.from_numpy(self._array).__dlpack__()


class FakePbUtils:
    """The few names of triton_python_backend_utils that llm_requests uses."""
    Tensor = FakeTensor

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.tensors = {t.name(): t.as_numpy() for t in output_tensors or []}
            self.error = error

    class Logger:
        lines: list = []

        @classmethod
        def log_info(cls, line):
            cls.lines.append(line)

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


class FakeSender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def request(**inputs):
    return {k: FakeTensor(k, v) for k, v in inputs.items()}


def sampling(d):
    return np.array([json.dumps(d).encode()], dtype=np.object_)


def test_a_request_is_read_into_the_engines_prompt_sampling_and_flags():
    req = request(input_ids=np.array([5, 6, 7], np.int64), positions=np.array([[0, 1, 2]] * 3, np.int64),
                  rope_delta=np.array([4], np.int64), sampling_parameters=sampling({"max_tokens": "9", "top_k": 3}),
                  stream=np.array([True]), visual_embeds=np.ones((2, 4), np.float32),
                  deepstack=np.zeros((3, 2, 4), np.float32), grid_thw=np.array([[1, 2, 4]], np.int64),
                  media_hashes=np.array([b"abc"], dtype=np.object_))
    prompt, vision, params, flags = parse_request(FakePbUtils, req, 4, {"temperature": 0.5})
    assert prompt.prompt_ids == [5, 6, 7] and prompt.rope_delta == 4 and tuple(prompt.positions.shape) == (3, 3)
    assert [(m.grid_thw, m.content_hash, m.num_tokens) for m in prompt.media] == [((1, 2, 4), "abc", 2)]
    assert params.max_tokens == 9 and params.top_k == 3 and params.temperature == 0.5     # a string coerced; a default
    assert tuple(vision[0].shape) == (2, 4) and len(vision[1]) == 3
    assert flags == {"stream": True, "exclude_input_in_output": False, "return_num_input_tokens": False,
                     "return_num_output_tokens": False}


@pytest.mark.parametrize("inputs,message", [
    ({}, "input_ids is required"),
    ({"input_ids": np.array([], np.int64)}, "input_ids is required"),
    ({"input_ids": np.array([1, 2], np.int64), "positions": np.zeros((3, 3), np.int64)}, "positions cover 3 tokens"),
    ({"input_ids": np.array([1], np.int64), "sampling_parameters": np.array([b"[1]"], dtype=np.object_)},
     "sampling_parameters must be a JSON object"),
    ({"input_ids": np.array([1], np.int64), "sampling_parameters": sampling({"max_tokens": "lots"})},
     "max_tokens must be a int"),
])
def test_what_a_client_sends_wrong_is_a_value_error(inputs, message):
    with pytest.raises(ValueError, match=message):
        parse_request(FakePbUtils, request(**inputs), 4, {})


def _out(text, finished=False, reason=None, logprobs=None, **kw):
    return RequestOutput("r", [1], text, finished, reason, 3, kw.get("n", 1), 0, logprobs=logprobs)


def _stream(**flags):
    sender, finished = FakeSender(), []
    flags = {"stream": False, "exclude_input_in_output": True, "return_num_input_tokens": False,
             "return_num_output_tokens": False, **flags}
    return ResponseStream(FakePbUtils, sender, flags, FakeTokenizer(), [1, 2], "client", lambda: finished.append(1)), \
        sender, finished


def test_without_streaming_one_final_response_has_the_whole_text_and_every_logprob():
    stream, sender, finished = _stream(exclude_input_in_output=False, return_num_output_tokens=True)
    stream.on_output(_out("ab", logprobs=[(7, -0.5, [])]))
    stream.on_output(_out("c", True, "stop", logprobs=[(8, -1.0, [])], n=2))
    [(response, flags)] = sender.sent
    assert flags == FINAL and finished == [1]
    assert response.tensors["text_output"][0] == b"<1><2>abc"               # the prompt's text first
    assert response.tensors["finish_reason"][0] == b"stop" and response.tensors["num_output_tokens"][0] == 2
    assert json.loads(response.tensors["logprobs"][0]) == [[7, -0.5, []], [8, -1.0, []]]
    assert "num_input_tokens" not in response.tensors


def test_streaming_sends_each_delta_and_holds_logprobs_for_the_next_response():
    stream, sender, finished = _stream(stream=True, return_num_input_tokens=True)
    stream.on_output(_out("", logprobs=[(7, -0.5, [])]))        # no text yet: nothing sent, the logprob kept
    stream.on_output(_out("ab"))
    stream.on_output(_out("c", True, "length"))
    texts = [(r.tensors["text_output"][0], f) for r, f in sender.sent]
    assert texts == [(b"ab", 0), (b"c", FINAL)] and finished == [1]
    assert json.loads(sender.sent[0][0].tensors["logprobs"][0]) == [[7, -0.5, []]]
    assert "logprobs" not in sender.sent[1][0].tensors and sender.sent[1][0].tensors["num_input_tokens"][0] == 3


@pytest.mark.parametrize("error,code,shown", [
    (EngineClientError("structured_output stopped after 6 tokens: parser error"), "INVALID_ARG",
     CLIENT_ERROR_PREFIX + "structured_output stopped after 6 tokens: parser error"),
    (RequestError("bad"), "INVALID_ARG", CLIENT_ERROR_PREFIX + "bad"),
    (EngineRequestError("RuntimeError while computing this request"), "INTERNAL", "internal error in llm"),
])
def test_an_error_ends_the_stream_as_the_clients_or_the_servers(error, code, shown):
    stream, sender, finished = _stream(stream=True)
    stream.on_output(_out("ab"))
    stream.on_output(error)
    (response, flags) = sender.sent[-1]
    assert flags == FINAL and finished == [1] and response.error.code == code
    assert response.error.message.startswith(shown)
    assert "Traceback" not in response.error.message


def test_every_llm_parameter_is_an_engine_setting_and_a_misspelt_one_is_refused(tmp_path, tiny_moe):
    """The llm model builds its EngineConfig from all of its config.pbtxt parameters but the Python
    backend's own: the shipped ones are all engine settings, and a misspelt one fails the load by
    name (it was dropped silently before: the server ran with the default)."""
    from qwen3vl_backend.config import ConfigError, EngineConfig
    from qwen3vl_backend.launch import _PARAM, TEMPLATE
    from qwen3vl_backend.serving.triton_params import model_settings

    def args(params: dict) -> dict:
        return {"model_config": json.dumps({"name": "llm", "parameters": {k: {"string_value": v}
                                                                          for k, v in params.items()}}),
                "model_repository": str(tmp_path / "llm")}
    text = (TEMPLATE / "llm" / "config.pbtxt").read_text()
    shipped = {m.group(1): "x" for m in _PARAM.finditer(text)}
    assert {"FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH", "model_path", "max_num_seqs"} <= set(shipped)
    settings = model_settings(args(shipped))
    assert set(settings) == set(shipped) - {"FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH"}
    names = {f for f in EngineConfig.__dataclass_fields__}
    assert set(settings) <= names
    good = model_settings(args({"FORCE_CPU_ONLY_INPUT_TENSORS": "no", "max_num_seqs": "4",
                                "model_path": str(tiny_moe)}))
    assert EngineConfig.from_settings(good).max_num_seqs == 4
    with pytest.raises(ConfigError, match="unknown engine setting 'max_num_seq'"):
        EngineConfig.from_settings(model_settings(args({"max_num_seq": "4", "model_path": str(tiny_moe)})))
