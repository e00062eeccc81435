"""Remote and local media, fetched by the adapter before a request reaches Triton.

Triton's `preprocess` step is not decoupled (Triton 2.51 allows one decoupled model per ensemble
chain, and `llm` is it), so a fetch there would hold its instance for as long as the remote end
likes. Here fetches are asynchronous: at most `max_concurrent` at once server-wide (SGLang's
--mm-max-concurrent-calls), each with the fetcher's own rules (address checks, streamed size
limit, socket deadline; qwen3vl_backend.processing.media), all of a request's within its
per-request timeout, and cancelled when its client goes away. A text-only request never waits
behind any of it. The bytes travel on as data: URIs, so Triton never reads the network or disk.
"""

from __future__ import annotations

import asyncio
import base64

from qwen3vl_backend.errors import RequestError
from qwen3vl_backend.processing.chat import MEDIA_INPUT, is_text_part
from qwen3vl_backend.processing.media import Cancel, MediaPolicy, fetch_bytes

_KEYS = ("image_url", "video_url", "image", "video")


class MediaFetcher:
    def __init__(self, policy: MediaPolicy, max_concurrent: int, timeout_s: float):
        self.policy, self.timeout_s = policy, timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)

    async def inline(self, messages: list[dict], cancel: Cancel) -> list[dict]:
        """`messages` with every http(s) and file:// media URL replaced by a data: URI of its
        bytes (the same list when there was none). Raises RequestError."""
        jobs = []
        for part in _parts(messages):
            for key in _KEYS:
                url = _url(part.get(key))
                # the scheme from the first bytes: a data: URI is megabytes (splitting and
                # lowercasing it whole took ~3 ms an image)
                if url is not None and url[:8].lower().startswith(("http://", "https://", "file://")):
                    jobs.append((part, key, url))
                    break
        if not jobs:
            return messages
        try:
            async with asyncio.timeout(self.timeout_s):
                blobs = await asyncio.gather(*(self._fetch(url, cancel) for _, _, url in jobs))
        except TimeoutError:
            cancel.cancel()                       # their sockets close; nothing runs on for nobody
            raise RequestError(f"media processing took longer than the {self.timeout_s:g}s per-request limit "
                               "(mm_per_request_timeout)") from None
        except BaseException:
            cancel.cancel()
            raise
        swap = {id(part): (key, "data:application/octet-stream;base64," + base64.b64encode(blob).decode())
                for (part, key, _), blob in zip(jobs, blobs)}
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [_replaced(p, *swap[id(p)]) if id(p) in swap else p for p in content]
            out.append({**m, "content": content})
        return out

    async def _fetch(self, url: str, cancel: Cancel) -> bytes:
        async with self._slots:
            if cancel.is_set:
                raise RequestError("request cancelled")
            return await asyncio.to_thread(fetch_bytes, url, self.policy, cancel)


def _parts(messages):
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, dict))


def _url(value):
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def _replaced(part: dict, key: str, uri: str) -> dict:
    value = part[key]
    return {**part, key: {**value, "url": uri} if isinstance(value, dict) else uri}


def split_media(messages: list) -> tuple[list, list[str]]:
    """(messages with each media part's url replaced by "media-input:N", the urls in order): the
    data URIs travel as the ensemble's `media` input, and preprocess parses only the small JSON
    left (it had parsed the whole body again after the adapter: 3.7 MB for two PNGs). Parts
    whose url is not a string are left as they are (preprocess refuses them)."""
    media: list[str] = []
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for p in content:
            for key in (_KEYS if isinstance(p, dict) and not is_text_part(p) else ()):
                url = _url(p.get(key))
                if url is not None:
                    ref = f"{MEDIA_INPUT}{len(media)}"
                    media.append(url)
                    p = _replaced(p, key, ref)
                    break
            parts.append(p)
        out.append({**m, "content": parts})
    return out, media

