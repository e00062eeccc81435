"""OpenAI-style chat messages -> the checkpoint's chat template, plus the ordered media list.

OpenAI parts (`text`, `image_url`, `video_url`) and HF parts (`image`, `video`) are accepted;
media parts become `{"type": "image"}` / `{"type": "video"}` items for the template (which
ignores unknown part types, so an unmapped `video_url` would silently vanish).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RequestError


@dataclass
class MediaRef:
    kind: str                      # "image" | "video"
    source: object                 # URL / data URI / path string, raw bytes, or a PIL image
    options: dict = field(default_factory=dict)   # min_pixels, max_pixels, fps, max_frames


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


def _normalize_part(part, where: str, media: list[MediaRef]) -> dict:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part):
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
