"""Streaming calls to the Triton `qwen3vl` ensemble over gRPC, one call per request.

Each request is its own gRPC stream. Leaving the iterator early (the HTTP client went away)
cancels that call and also sends `llm` an explicit cancel for the request id: Triton 2.51 does
not pass a gRPC cancellation through an ensemble to its decoupled step. Inputs of 64 KB or more
(images as data URIs) go through a shared-memory region where Triton is on this host
(shm_inputs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from dataclasses import dataclass

import grpc

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from qwen3vl_backend.serving.triton_params import CLIENT_ERROR_PREFIX

from .shm_inputs import ShmInputs, is_region_error


class TritonRequestError(Exception):
    def __init__(self, message: str, client_error: bool, unavailable: bool = False):
        super().__init__(message)
        self.client_error, self.unavailable = client_error, unavailable


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    num_cached_tokens: int | None
    logprobs: list | None = None       # [(token id, logprob, [(id, logprob), ...]), ...] when asked
    prompt_logprobs: list | None = None   # the same for prompt tokens 1..L-1, with the first delta


def _input(name: str, arr: np.ndarray):
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def is_local(url: str) -> bool:
    """Whether a host:port names this machine: a loopback address or `localhost` (no name is
    looked up: the client is made on the event loop)."""
    host = url.rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TritonLLMClient:
    def __init__(self, url: str, model_name: str = "qwen3vl", llm_model: str = "llm", shm_bytes: int = 0):
        """`shm_bytes`: the shared-memory region for large inputs where Triton is local (0: none)."""
        self.url, self.model_name, self.llm_model = url, model_name, llm_model
        # Triton may be restarted under us (the launcher's supervisor): reconnect within a second
        # instead of gRPC's default backoff of up to two minutes
        self._client = grpcclient.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self._tasks: set[asyncio.Task] = set()
        self.shm = ShmInputs(self._client, shm_bytes) if shm_bytes and is_local(url) else None

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready()) and bool(await self._client.is_model_ready(self.model_name))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self.shm is not None:
            await self.shm.close()
        await self._client.close()

    def stream(self, request_id: str, text: bytes, sampling: dict, media: list[str] = (), images: list[str] = ()):
        """`text`: the JSON chat request (its `messages` are used), through the ensemble; `media`:
        the sources its media parts name as "media-input:N". Or a plain prompt with `images`, the
        ensemble's `image` input (the native /generate). Yields Delta per response until the
        final one; raises TritonRequestError."""
        prompt = [("text_input", np.array([text], dtype=np.object_))]
        if media:
            prompt.append(("media", np.array([m.encode() for m in media], dtype=np.object_)))
        if images:
            prompt.append(("image", np.array([m.encode() for m in images], dtype=np.object_)))
        return self._stream(self.model_name, request_id, prompt, sampling)

    def stream_ids(self, request_id: str, ids: list[int], sampling: dict):
        """A text-only prompt's token ids straight to `llm` (see text_prompts.py); as `stream`."""
        return self._stream(self.llm_model, request_id, [("input_ids", np.asarray(ids, dtype=np.int64))], sampling)

    async def _stream(self, model: str, request_id: str, prompt: list, sampling: dict):
        """`prompt`: (name, array) pairs. A request that Triton refuses for naming a region it no
        longer has (it restarted) registers a new one and goes again, once."""
        for attempt in (0, 1):
            sent = False
            try:
                # closed at once where the caller leaves early (its finally cancels the request)
                async with contextlib.aclosing(self._stream_once(model, request_id, prompt, sampling)) as deltas:
                    async for delta in deltas:
                        sent = True
                        yield delta
                return
            except TritonRequestError as e:
                if sent or attempt or self.shm is None or not is_region_error(str(e)):
                    raise
                self.shm.invalidate()

    async def _stream_once(self, model: str, request_id: str, prompt: list, sampling: dict):
        releases, inputs = [], []
        shm = self.shm is not None and await self.shm.ready()
        for name, arr in prompt:
            placed = self.shm.place(name, arr) if shm else None
            if placed is None:
                inputs.append(_input(name, arr))
            else:
                inputs.append(placed[0])
                releases.append(placed[1])
        inputs += [
            _input("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_)),
            _input("stream", np.array([True])),
            _input("exclude_input_in_output", np.array([True])),
            _input("return_num_input_tokens", np.array([True])),
            _input("return_num_output_tokens", np.array([True])),
        ]

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

        finished = False
        ended = False       # Triton itself ended the request (its final response or its error)
        try:
            responses = self._client.stream_infer(inputs_iterator=requests())
        except InferenceServerException as e:
            for release in releases:
                release()
            raise TritonRequestError(f"could not reach Triton: {e}", False, unavailable=True) from None
        try:
            async for result, error in _rpc_errors(responses):
                if error is not None:
                    ended = True
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
                    logprobs=_json(result, "logprobs"),
                    prompt_logprobs=_json(result, "prompt_logprobs"),
                )
                if delta.finish_reason:
                    finished = ended = True
                yield delta
                if finished:
                    return
            raise TritonRequestError("the model server ended the request without a final response", False,
                                     unavailable=True)
        except TritonRequestError:
            finished = True           # refused, or the server went away: nothing is running
            raise
        finally:
            responses.cancel()
            for release in releases:  # Triton reads no more of a request it has ended; one whose
                release(ended)        # stream broke or was left may still be read: kept a while
            if not finished:          # the caller left early: stop the generation in Triton
                self._tasks.add(t := asyncio.get_running_loop().create_task(self.cancel(request_id)))
                t.add_done_callback(self._tasks.discard)

    async def cancel(self, request_id: str, timeout_s: float = 10.0) -> None:
        """End the request with this id in `llm`, now or as soon as it arrives there (explicit
        cancel, see serving/cancel.py)."""
        async def requests():
            yield {"model_name": self.llm_model, "request_id": request_id, "inputs": [_input("cancel", np.array([True]))]}

        try:
            call = self._client.stream_infer(inputs_iterator=requests())
        except InferenceServerException:
            return
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in call:      # the stream ends once the cancel is answered
                    pass
        except (TimeoutError, InferenceServerException, grpc.aio.AioRpcError):
            pass
        finally:
            call.cancel()


async def _rpc_errors(responses):
    """The response stream, with a broken connection (Triton stopped or restarting) as a
    TritonRequestError instead of a gRPC exception."""
    it = responses.__aiter__()
    while True:
        try:
            item = await it.__anext__()
        except StopAsyncIteration:
            return
        except grpc.aio.AioRpcError as e:
            raise TritonRequestError(f"gRPC {e.code().name}: {e.details()}", False,
                                     unavailable=e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                              grpc.StatusCode.INTERNAL)) from None
        yield item


def _json(result, name):
    arr = result.as_numpy(name)
    return None if arr is None or not arr.size else json.loads(arr.reshape(-1)[0])


def _scalar(result, name):
    arr = result.as_numpy(name)
    return None if arr is None else int(arr.reshape(-1)[0])
