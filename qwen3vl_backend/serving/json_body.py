"""json.loads for request bodies that carry megabytes of data URIs, with its results and errors.

CPython's JSON scanner builds a long string a character at a time: a 3.7 MB body with one PNG
data URI took 8-9 ms to parse in the adapter (and ~2 ms for a 1.1 MB JPEG one), most of a
request's host time outside Triton. `loads` cuts each long string that needs no unescaping out
of the body first (found by a string-token walk that jumps from quote to quote), parses what is
left, and puts the strings back, decoded from their bytes in one call each.

A string is cut out only when its bytes are its value: no backslash, no control character (JSON
forbids them raw), valid UTF-8. Anything else stays in place for json.loads, and a body that
json.loads refuses is parsed again whole, so every error is its own (message and position).
Bodies of many strings are parsed whole: the walk costs Python steps per string.
"""

from __future__ import annotations

import json
import os

import numpy as np

MIN_BODY = 1 << 17        # smaller bodies: json.loads alone is fast
MIN_STRING = 1 << 14      # strings cut out are at least this long
MAX_STEPS = 4096          # quotes looked at before the walk gives up (the body is parsed whole)


def loads(raw: bytes | str):
    """json.loads(raw), faster where `raw` holds long plain strings (data URIs)."""
    if len(raw) < MIN_BODY or raw[:1] not in ("{", "[", b"{", b"["):
        return json.loads(raw)
    if isinstance(raw, str):
        try:
            data = raw.encode()
        except UnicodeEncodeError:          # lone surrogates: json.loads' own business
            return json.loads(raw)
    else:
        data = raw
    spans = _long_plain_strings(data)
    if not spans:
        return json.loads(raw)
    nonce = os.urandom(8).hex()
    holes, parts, last = {}, [], 0
    for i, (start, end, text) in enumerate(spans):
        key = f"\x00{nonce}:{i}"
        holes[key] = text
        parts += [data[last:start], b"\\u0000" + key[1:].encode()]
        last = end
    parts.append(data[last:])
    try:
        value = json.loads(b"".join(parts))
    except json.JSONDecodeError:            # the error and its position as the whole body gives them
        return json.loads(raw)
    return _fill(value, holes)


def _long_plain_strings(data: bytes) -> list[tuple[int, int, str]] | None:
    """(start, end, value) of the contents of the string tokens of `data` that are at least
    MIN_STRING bytes long and whose bytes are their value; None when the walk gives up."""
    spans, steps = [], 0
    pos = data.find(b'"')
    while pos != -1:
        end = data.find(b'"', pos + 1)
        while end != -1 and _escaped(data, pos + 1, end):
            steps += 1
            if steps > MAX_STEPS:
                return None
            end = data.find(b'"', end + 1)
        steps += 1
        if end == -1 or steps > MAX_STEPS:  # unterminated (json.loads says so), or too many strings
            return None if end != -1 else spans
        if end - pos - 1 >= MIN_STRING and (text := _plain(data, pos + 1, end)) is not None:
            spans.append((pos + 1, end, text))
        pos = data.find(b'"', end + 1)
    return spans


def _escaped(data: bytes, start: int, quote: int) -> bool:
    """Whether the quote at `quote` is escaped: an odd run of backslashes before it, not
    reaching back past `start` (the string's first byte)."""
    run, window = 0, 16
    while True:
        lo = max(start, quote - run - window)
        chunk = data[lo:quote - run]
        kept = len(chunk.rstrip(b"\\"))
        run += len(chunk) - kept
        if kept or lo == start:
            return run % 2 == 1
        window *= 2


def _plain(data: bytes, start: int, end: int) -> str | None:
    """data[start:end] decoded, where those bytes are a string's value as they stand (no
    escapes, no control characters, UTF-8); else None."""
    if data.find(b"\\", start, end) != -1 or int(np.frombuffer(data, np.uint8, end - start, start).min()) < 0x20:
        return None
    try:
        return str(memoryview(data)[start:end], "utf-8")      # no copy of the bytes first
    except UnicodeDecodeError:
        return None


def _fill(value, holes: dict[str, str]):
    """`value` with every string that is a key of `holes` (values and object keys) replaced."""
    if isinstance(value, str):
        return holes.get(value, value)
    stack = [value] if isinstance(value, (dict, list)) else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any(k in holes for k in node):
                items = [(holes.get(k, k), v) for k, v in node.items()]
                node.clear()
                for k, v in items:          # a repeated key keeps its first place and last value, as parsed
                    node[k] = v
            children = node.items()
        else:
            children = enumerate(node)
        for k, v in list(children):
            if isinstance(v, str):
                if v in holes:
                    node[k] = holes[v]
            elif isinstance(v, (dict, list)):
                stack.append(v)
    return value
