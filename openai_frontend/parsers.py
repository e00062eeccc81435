"""The model's raw text -> OpenAI's message fields: reasoning, content and tool calls.

Qwen3 (and Qwen3-VL) Thinking checkpoints write their reasoning first and close it with
`</think>` (the template opens `<think>` at the end of the prompt; the output may repeat it).
Tool calls, as the chat template instructs, are `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>` blocks (SGLang's `qwen25` parser, vLLM's `hermes`).

`OutputParser.feed(text)` takes each streamed piece and returns the OpenAI delta fields to send
now; `finish()` flushes what was held back. Text that may be the start of a tag is held until it
is known not to be. A tool-call block is sent once it is complete: a delta with the call's id and
name, then one with its arguments (a client concatenating `arguments` deltas, as OpenAI's SDK
does, gets the same call as the non-streamed answer). A block whose JSON does not parse stays
content, as the model wrote it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
REASONING_PARSERS = ("qwen3",)
TOOL_CALL_PARSERS = ("qwen25", "hermes")


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_call(block: str) -> dict | None:
    """The JSON inside a <tool_call> block -> an OpenAI tool call, or None if it is not one."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


@dataclass
class OutputParser:
    reasoning: bool = False          # split out <think> ... </think>
    thinking_open: bool = False      # the prompt ended inside <think> (the template opened it)
    tools: bool = False              # parse <tool_call> blocks
    parallel_tool_calls: bool = True
    _buf: str = ""
    _state: str = "start"            # start | think | content | call
    calls: list[dict] = field(default_factory=list)
    _sent_content: bool = False

    def __post_init__(self):
        self._state = "think" if self.reasoning and self.thinking_open else "start"

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        out: list[dict] = []
        while True:
            before = (self._state, len(self._buf))
            out += self._step()
            if (self._state, len(self._buf)) == before:
                return _merge(out)

    def finish(self) -> list[dict]:
        """At the end of the output: what was held back, as what it turned out to be."""
        out = self._step()
        rest, self._buf = self._buf, ""
        if self._state == "call":          # an unclosed block: the model's text, as content
            rest = CALL_OPEN + rest
        if rest:
            out.append({"reasoning_content": rest} if self._state == "think" else {"content": rest})
        return _merge(out)

    def _step(self) -> list[dict]:
        buf = self._buf
        if self._state == "start":
            if not self.reasoning:
                self._state = "content"
                return []
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buf, self._state = stripped[len(THINK_OPEN):].lstrip("\n"), "think"
            elif THINK_OPEN.startswith(stripped) and stripped != "" or not stripped:
                return []                  # could still become <think>
            else:
                self._state = "content"
            return []
        if self._state == "think":
            at = buf.find(THINK_CLOSE)
            if at >= 0:
                self._buf, self._state = buf[at + len(THINK_CLOSE):].lstrip("\n"), "content"
                return [{"reasoning_content": buf[:at]}] if buf[:at] else []
            keep = _held(buf, THINK_CLOSE)
            self._buf = buf[len(buf) - keep:]
            return [{"reasoning_content": buf[: len(buf) - keep]}] if len(buf) > keep else []
        if self._state == "content":
            at = buf.find(CALL_OPEN) if self.tools else -1
            if at >= 0:
                self._buf, self._state = buf[at + len(CALL_OPEN):], "call"
                return self._content(buf[:at])
            keep = _held(buf, CALL_OPEN) if self.tools else 0
            self._buf = buf[len(buf) - keep:]
            return self._content(buf[: len(buf) - keep])
        # inside a <tool_call> block
        at = buf.find(CALL_CLOSE)
        if at < 0:
            return []
        block, self._buf, self._state = buf[:at], buf[at + len(CALL_CLOSE):], "content"
        call = parse_call(block.strip())
        if call is None:
            return self._content(CALL_OPEN + block + CALL_CLOSE)
        if self.calls and not self.parallel_tool_calls:
            return []                      # one call asked for: later ones are dropped
        index = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        return [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                 "function": {"name": fn["name"], "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]}]

    def _content(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.calls:                     # text between or after calls: whitespace is not content
            text = text.strip()
            if not text:
                return []
        elif not self._sent_content:
            text = text.lstrip("\n") if self.reasoning else text
            if not text:
                return []
        self._sent_content = True
        return [{"content": text}]


def _merge(deltas: list[dict]) -> list[dict]:
    """Neighbouring deltas of the same text field as one."""
    out: list[dict] = []
    for d in deltas:
        key = next(iter(d))
        if out and key in ("content", "reasoning_content") and list(out[-1]) == [key]:
            out[-1] = {key: out[-1][key] + d[key]}
        else:
            out.append(d)
    return out


def parse_whole(text: str, reasoning: bool, thinking_open: bool, tools: bool, parallel: bool = True) -> dict:
    """A whole answer -> {"content", "reasoning_content"?, "tool_calls"?} as OpenAI's message has them."""
    p = OutputParser(reasoning, thinking_open, tools, parallel)
    deltas = p.feed(text) + p.finish()
    content = "".join(d.get("content", "") for d in deltas)
    thought = "".join(d.get("reasoning_content", "") for d in deltas)
    msg: dict = {"content": content if content or not (p.calls or thought) else None}
    if reasoning:
        msg["reasoning_content"] = thought or None
    if p.calls:
        msg["tool_calls"] = p.calls
    return msg
