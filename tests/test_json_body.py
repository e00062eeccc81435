"""serving.json_body.loads: json.loads' value and errors, faster for bodies of long plain strings."""

import json
import random

import pytest

from qwen3vl_backend.serving import json_body


@pytest.fixture
def small(monkeypatch):
    """Cut-out sizes small enough for hand-written bodies."""
    monkeypatch.setattr(json_body, "MIN_BODY", 16)
    monkeypatch.setattr(json_body, "MIN_STRING", 4)


def outcome(fn, raw):
    try:
        return "ok", fn(raw)
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


def same(raw):
    want = outcome(json.loads, raw)
    got = outcome(json_body.loads, raw)
    assert got == want, raw
    if want[0] == "ok":     # key order too (dict equality ignores it)
        assert json.dumps(got[1]) == json.dumps(want[1]), raw
    return got


@pytest.mark.parametrize("raw", [
    b'{"a": "plain string value", "b": [1, "another long one", {"c": "nested value"}]}',
    b'{"long key here": "v", "x": "y"}',                               # a long key
    b'{"a": "same value", "a": "other value", "b": "same value"}',    # a repeated key: first place, last value
    b'{"k": "one \\"quoted\\" word", "j": "done here"}',              # escaped quotes inside a long string
    b'{"k": "ends in a backslash \\\\", "j": "next string"}',         # an escaped backslash before the quote
    b'{"k": "ends in three \\\\\\"", "j": "still the same string"}',  # \\\" : an escaped quote after one
    b'{"k": "tab\there raw", "j": "fine string"}',                    # a raw control character: the error
    b'{"k": "bad utf8 \xff here", "j": "fine string"}',               # invalid UTF-8: the error
    b'{"k": "surrogate \xed\xa0\x80 bytes"}',                        # encoded surrogate (surrogatepass)
    b'{"k": "caf\xc3\xa9 au lait", "n": [1.5, -2, null, true]}',     # UTF-8 taken whole
    b'{"k": "unterminated string',
    b'{"k": "fine string", "n": 01}',                                 # the error after a cut-out string
    b'{"k": "fine string",, "n": 1}',
    b'["list at the top", "of long strings"]',
    b'{"k": "\\u0000 written escaped"}',                               # what a hole looks like
    b'{"k": "long string"} trailing',
    b'{"k": "x"}',
])
def test_hand_written_bodies_match_json_loads(small, raw):
    same(raw)
    same(raw.decode("utf-8", "replace"))


def test_errors_keep_the_whole_bodys_positions(small):
    raw = b'{"k": "a long enough string", "n": tru}'
    kind, message = same(raw)
    assert kind == "JSONDecodeError" and "(char 35)" in message


def test_random_bodies_match_json_loads(small, monkeypatch):
    rng = random.Random(0)
    cut = []
    real = json_body._long_plain_strings
    monkeypatch.setattr(json_body, "_long_plain_strings", lambda data: cut.append(bool(r := real(data))) or r)
    alphabet = ['a', 'b', '"', '\\', '\\\\', '\\"', '\t', 'é', '/', ' ', '\\n', '\\u00e9']

    def text():
        chars = alphabet if rng.random() < 0.3 else ["a", "b", "é", " "]     # most strings plain
        return "".join(rng.choice(chars) for _ in range(rng.randrange(0, 14)))

    def value(depth=0):
        r = rng.random()
        if depth < 3 and r < 0.3:
            return "{" + ", ".join(f'"{text()}": {value(depth + 1)}' for _ in range(rng.randrange(0, 4))) + "}"
        if depth < 3 and r < 0.5:
            return "[" + ", ".join(value(depth + 1) for _ in range(rng.randrange(0, 4))) + "]"
        return rng.choice([f'"{text()}"', f'"{text()}"', "1", "null", "-2.5e3"])

    seen = {}
    for _ in range(3000):
        cut.clear()
        kind = same(("{" if rng.random() < 0.9 else "[") + value()[1:])[0]
        key = (kind, any(cut))
        seen[key] = seen.get(key, 0) + 1
    # parsed and refused bodies, both with strings cut out
    assert seen.get(("ok", True), 0) > 200 and seen.get(("JSONDecodeError", True), 0) > 200, seen


def test_a_data_uri_body_is_cut_and_filled(monkeypatch):
    uri = "data:image/png;base64," + "QUJD" * 100_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "what is it?"}]}]}).encode()
    cut = []
    real = json_body._long_plain_strings
    monkeypatch.setattr(json_body, "_long_plain_strings", lambda data: cut.append(r := real(data)) or r)
    parsed = json_body.loads(body)
    assert parsed == json.loads(body)
    assert [text for _, _, text in cut[0]] == [uri]       # the fast path ran, on the URI alone


def test_many_strings_are_parsed_whole(monkeypatch, small):
    monkeypatch.setattr(json_body, "MAX_STEPS", 8)
    raw = json.dumps({f"key {i}": f"value {i}" for i in range(20)}).encode()
    assert json_body._long_plain_strings(raw) is None
    assert json_body.loads(raw) == json.loads(raw)


def reference_spans(data: bytes) -> list[tuple[int, int]]:
    """The string tokens' content spans, lexed a byte at a time, kept as _long_plain_strings keeps them."""
    spans, i, start = [], 0, None
    while i < len(data):
        c = data[i:i + 1]
        if start is None:
            if c == b'"':
                start = i + 1
        elif c == b"\\":
            i += 1
        elif c == b'"':
            if i - start >= json_body.MIN_STRING and json_body._plain(data, start, i) is not None:
                spans.append((start, i))
            start = None
        i += 1
    return spans


def test_the_string_walk_finds_the_tokens_a_lexer_does(small):
    """Mis-lexed spans mostly make the cut body invalid, and loads then parses the whole body:
    the walk itself is compared, so a walk that is wrong only costs no time does not pass."""
    rng = random.Random(1)
    pieces = ['"', '\\', '\\\\', '\\"', '\\' * 33, '\\' * 40, "ab", "cd ef", ": ", ", ", "{", "}", "\t", "é"]
    for _ in range(3000):
        data = ("{" + "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))).encode()
        got = json_body._long_plain_strings(data)
        assert [(s, e) for s, e, _ in got] == reference_spans(data), data
