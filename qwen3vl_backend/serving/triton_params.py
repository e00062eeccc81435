"""Reading Triton model settings: `config.pbtxt` parameters as a plain dict of strings.

`${TRITON_MODEL_DIRECTORY}` in a value is the model's own directory (Triton expands `$$...`
only in EXECUTION_ENV_PATH). The engine's settings then go through EngineConfig.from_settings,
the one parser shared with the launcher.
"""

from __future__ import annotations

import json
import logging
import os

# the Python backend's own parameters: not the model's settings
RESERVED = {"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"}
log = logging.getLogger("qwen3vl")


def model_settings(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    model_dir = args.get("model_repository", "")
    if model_dir and os.path.basename(model_dir.rstrip("/")) != cfg.get("name"):
        model_dir = os.path.join(model_dir, cfg.get("name", ""))
    out = {}
    for key, value in cfg.get("parameters", {}).items():
        if key in RESERVED:
            continue
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        text = text.replace("${TRITON_MODEL_DIRECTORY}", model_dir).replace("$TRITON_MODEL_DIRECTORY", model_dir)
        out[key] = os.path.normpath(text) if key.endswith("_path") and text else text
    return out


def pick(settings: dict[str, str], keys) -> dict[str, str]:
    return {k: settings[k] for k in keys if k in settings}

# Triton's streamed errors carry only a message, so client-caused ones are marked by prefix;
# the OpenAI adapter maps the prefix to HTTP 400 and anything else to 500.
CLIENT_ERROR_PREFIX = "invalid request: "


def client_error_message(e: Exception) -> str:
    return CLIENT_ERROR_PREFIX + str(e)


def error_response(pb_utils, e: Exception, model: str, request_id: str):
    """A client mistake (ValueError: RequestError, SamplingError, ...) as INVALID_ARG with its
    message; anything else is a server fault: logged here with the request id, answered with
    INTERNAL and no detail (no traceback, path or repr leaves the server)."""
    if isinstance(e, ValueError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(client_error_message(e), pb_utils.TritonError.INVALID_ARG))
    log.error("%s: request %r failed: %s: %s", model, request_id, type(e).__name__, e, exc_info=e)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        f"internal error in {model} (request id {request_id!r}; the server log has the details)",
        pb_utils.TritonError.INTERNAL))

