"""OpenAI-style chat messages -> the checkpoint's chat template, plus the ordered media list.

OpenAI parts (`text`, `image_url`, `video_url`) and HF parts (`image`, `video`) are accepted;
media parts become `{"type": "image"}` / `{"type": "video"}` items for the template (which
ignores unknown part types, so an unmapped `video_url` would silently vanish).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, RequestError

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass
class MediaRef:
    kind: str                      # "image" | "video"
    source: object                 # URL / data URI / path string, raw bytes, or a PIL image
    options: dict = field(default_factory=dict)   # min_pixels, max_pixels, fps, max_frames


# a media part's url naming the request's N-th `media` input (Triton's preprocess; the OpenAI
# adapter sends data URIs so, outside the JSON)
MEDIA_INPUT = "media-input:"

_ROLES = {"system", "user", "assistant", "tool"}
_MEDIA_OPTIONS = {"image": ("min_pixels", "max_pixels"), "video": ("fps", "max_frames", "min_pixels", "max_pixels")}


def normalize_messages(messages) -> tuple[list[dict], list[MediaRef]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    out, media = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise RequestError(f"messages[{i}] needs a 'role' of {sorted(_ROLES)}")
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({**msg, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            parts.append(_normalize_part(part, f"messages[{i}].content[{j}]", media))
        out.append({**msg, "content": parts})
    return out, media


def is_text_part(part) -> bool:
    """A content part read as text: typed "text", or untyped with a "text" key (whatever else it holds)."""
    return isinstance(part, dict) and (part.get("type") == "text" or (part.get("type") is None and "text" in part))


def _normalize_part(part, where: str, media: list[MediaRef]) -> dict:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be an object")
    kind = part.get("type")
    if is_text_part(part):
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    for media_kind, keys in (("image", ("image_url", "image")), ("video", ("video_url", "video"))):
        if kind in keys or (kind is None and any(k in part for k in keys)):
            value = next((part[k] for k in keys if k in part), None)
            options = {}
            if isinstance(value, dict):
                options = {k: value[k] for k in _MEDIA_OPTIONS[media_kind] if k in value}
                value = value.get("url")
            for k in _MEDIA_OPTIONS[media_kind]:
                if k in part:
                    options[k] = part[k]
            if value is None or (isinstance(value, str) and not value):
                raise RequestError(f"{where}: a {kind} part needs a url")
            media.append(MediaRef(media_kind, value, options))
            return {"type": media_kind}
    raise RequestError(f"{where}: unsupported content part type {kind!r} "
                       "(expected text, image_url or video_url)")


class ChatTemplate:
    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except TemplateError as e:
            raise RequestError(f"chat template rejected the messages: {e}") from e


def _raise(message):
    raise TemplateError(message)


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The checkpoint's chat_template.jinja, or the bundled Qwen3-VL one."""
    own = Path(model_dir) / "chat_template.jinja"
    return ChatTemplate((own if own.exists() else DATA / "chat_template.jinja").read_text())


# names the template's own variables use: chat_template_kwargs may not replace them
_RESERVED_KWARGS = {"messages", "tools", "add_generation_prompt", "raise_exception"}


def check_template_extras(tools, template_kwargs) -> tuple[list | None, dict]:
    """OpenAI `tools` and `chat_template_kwargs` as the template takes them; RequestError if malformed."""
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > 128:
            raise RequestError("'tools' must be a list of at most 128 tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                   f"'parameters': {{...}}}}}}")
            if "parameters" in fn and not isinstance(fn["parameters"], dict):
                raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema object")
    kwargs = template_kwargs or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object")
    bad = sorted(set(kwargs) & _RESERVED_KWARGS)
    if bad:
        raise RequestError(f"chat_template_kwargs may not set {bad}")
    return (tools or None), kwargs


def check_prompt_end(add_generation_prompt, continue_final_message) -> None:
    """vLLM's two flags for how a chat prompt ends: the assistant's header opened for a new answer
    (the default), or the last (assistant) message left open for the model to go on with it."""
    for name, v in (("add_generation_prompt", add_generation_prompt),
                    ("continue_final_message", continue_final_message)):
        if not isinstance(v, bool):
            raise RequestError(f"'{name}' must be a boolean")
    if add_generation_prompt and continue_final_message:
        raise RequestError("continue_final_message and add_generation_prompt cannot both be true "
                           "(set add_generation_prompt to false)")


def render_chat(template: ChatTemplate, messages, tools=None, template_kwargs=None, add_generation_prompt=True,
                continue_final_message=False) -> tuple[str, list[MediaRef]]:
    """OpenAI messages (and tools, chat_template_kwargs such as enable_thinking) -> (the prompt
    text, one pad per media item; the media in order). `continue_final_message`: the prompt ends
    with the last message's text, which must be the assistant's (a prefilled answer), cut where
    the template renders it (the end of its turn is dropped)."""
    tools, kwargs = check_template_extras(tools, template_kwargs)
    check_prompt_end(add_generation_prompt, continue_final_message)
    template_messages, refs = normalize_messages(messages)
    text = template.render(template_messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
    if continue_final_message:
        text = _open_final_message(text, template_messages[-1])
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the messages contain text that is not valid Unicode (an unpaired surrogate "
                           "such as \\ud800)") from None
    return text, refs


def _open_final_message(text: str, last: dict) -> str:
    if last["role"] != "assistant":
        raise RequestError("continue_final_message needs the last message to be the assistant's")
    content = last["content"]
    final = content if isinstance(content, str) else "".join(p.get("text", "") for p in content if is_text_part(p))
    at = text.rfind(final) if final else -1
    if at < 0:
        raise RequestError("continue_final_message needs the last message's text, as the chat template renders it")
    return text[:at + len(final)]


def parse_mm_limits(text: str) -> dict[str, int]:
    """`{"image": 4, "video": 1}` or `image=4,video=1` -> {"image": 4, "video": 1} (vLLM's two forms
    of --limit-mm-per-prompt; kinds left out keep their defaults: 16 images, 2 videos)."""
    limits = {"image": 16, "video": 2}
    text = text.strip()
    try:
        given = json.loads(text) if text.startswith("{") else \
            {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        raise ConfigError(f"limit_mm_per_prompt {text!r} is neither JSON nor image=N,video=N") from None
    for kind, n in given.items():
        if kind not in limits or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"limit_mm_per_prompt: {kind!r}={n!r} (kinds: image, video; counts >= 0)")
        limits[kind] = n
    return limits
