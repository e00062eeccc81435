"""Streaming calls to the Triton `qwen3vl` ensemble over gRPC, one call per request.

Each request is its own gRPC stream, so leaving the iterator early (the HTTP client went away)
cancels that call, and Triton marks the request cancelled for the `llm` model to abort.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from qwen3vl_backend.serving.triton_params import CLIENT_ERROR_PREFIX


class TritonRequestError(Exception):
    def __init__(self, message: str, client_error: bool):
        super().__init__(message)
        self.client_error = client_error


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    num_cached_tokens: int | None


def _input(name: str, arr: np.ndarray):
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


class TritonLLMClient:
    def __init__(self, url: str, model_name: str = "qwen3vl"):
        self.url, self.model_name = url, model_name
        self._client = grpcclient.InferenceServerClient(url)

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready()) and bool(await self._client.is_model_ready(self.model_name))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()

    async def stream(self, request_id: str, body: dict, sampling: dict):
        """Yields Delta per response until the final one; raises TritonRequestError."""
        inputs = [
            _input("text_input", np.array([json.dumps(body).encode()], dtype=np.object_)),
            _input("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_)),
            _input("stream", np.array([True])),
            _input("exclude_input_in_output", np.array([True])),
            _input("return_num_input_tokens", np.array([True])),
            _input("return_num_output_tokens", np.array([True])),
        ]

        async def requests():
            yield {"model_name": self.model_name, "inputs": inputs, "request_id": request_id}

        responses = self._client.stream_infer(inputs_iterator=requests())
        try:
            async for result, error in responses:
                if error is not None:
                    message = error.message() or str(error)
                    client = CLIENT_ERROR_PREFIX in message
                    if client:
                        message = message[message.index(CLIENT_ERROR_PREFIX) + len(CLIENT_ERROR_PREFIX):]
                    raise TritonRequestError(message, client)
                delta = Delta(
                    text=result.as_numpy("text_output").reshape(-1)[0].decode("utf-8", "replace"),
                    finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode() or None,
                    num_input_tokens=_scalar(result, "num_input_tokens"),
                    num_output_tokens=_scalar(result, "num_output_tokens"),
                    num_cached_tokens=_scalar(result, "num_cached_tokens"),
                )
                yield delta
                if delta.finish_reason:
                    return
        finally:
            responses.cancel()


def _scalar(result, name):
    arr = result.as_numpy(name)
    return None if arr is None else int(arr.reshape(-1)[0])
