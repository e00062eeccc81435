"""Errors leave the server as a user can act on them: a client's mistake with its message (400),
a server fault with no detail but a request id to quote (the detail is logged)."""

import logging
from types import SimpleNamespace

from openai_frontend.protocol import from_triton
from qwen3vl_backend.serving.triton_params import CLIENT_ERROR_PREFIX, error_response


class _FakePbUtils:
    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    @staticmethod
    def InferenceResponse(error=None):
        return SimpleNamespace(error=error)


def test_client_mistakes_keep_their_message():
    r = error_response(_FakePbUtils, ValueError("top_p must be in (0, 1], got 0"), "llm", "req-1")
    assert r.error.code == "INVALID_ARG" and r.error.message == CLIENT_ERROR_PREFIX + "top_p must be in (0, 1], got 0"


def test_server_faults_carry_no_detail_but_are_logged(caplog):
    fault = RuntimeError("boom in /work/main/qwen3vl_backend/secret.py at <object at 0x7f00>")
    with caplog.at_level(logging.ERROR):
        r = error_response(_FakePbUtils, fault, "preprocess", "req-42")
    assert r.error.code == "INTERNAL"
    assert "req-42" in r.error.message and "/work" not in r.error.message and "0x7f00" not in r.error.message
    assert "boom in /work/main" in caplog.text and "req-42" in caplog.text


def test_adapter_maps_triton_errors_to_400_500_503(caplog):
    assert from_triton("bad seed", True, "r1").status == 400
    with caplog.at_level(logging.ERROR):
        e = from_triton("Traceback (most recent call last): File /x.py", False, "r2")
    assert e.status == 500 and "Traceback" not in e.message and "r2" in e.message and "Traceback" in caplog.text
    assert from_triton("gRPC UNAVAILABLE", False, "r3", unavailable=True).status == 503
