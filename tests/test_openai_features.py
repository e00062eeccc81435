"""The adapter's OpenAI features on canned model outputs: reasoning split, tool calls (rendered for
the model, parsed back, streamed as OpenAI streams them), n, chat_template_kwargs, continuous usage,
/v1/models. The openai SDK talks to the app in-process; a fake Triton client plays the model and
records what it was sent. (The same features against the served tiny model: test_server.py.)
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from openai_frontend.app import FrontendSettings, create_app
from openai_frontend.parsers import OutputParser, parse_whole
from openai_frontend.triton_client import Delta
from qwen3vl_backend.processing.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
THOUGHT_AND_CALL = ('Paris is a city.\nI should call the tool.</think>\n\nLet me check.\n<tool_call>\n'
                    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>')


class FakeTriton:
    """Answers every request with `output`, cut into `piece`-character deltas; records requests."""

    def __init__(self, output: str, piece: int = 3, finish: str = "stop"):
        self.output, self.piece, self.finish, self.sent = output, piece, finish, []

    async def ready(self):
        return True

    async def close(self):
        pass

    def stream(self, rid, text, sampling, media=(), images=()):
        self.sent.append(("ensemble", rid, json.loads(text) if text.startswith(b"{") else text.decode(), sampling))
        self.media, self.images = list(media), list(images)
        return self._deltas(sampling)

    def stream_ids(self, rid, ids, sampling):
        self.sent.append(("llm", rid, ids, sampling))
        return self._deltas(sampling)

    async def _deltas(self, sampling):
        text = self.output.replace("{seed}", str(sampling.get("seed")))
        pieces = [text[i:i + self.piece] for i in range(0, len(text), self.piece)] or [""]
        k = sampling.get("logprobs")
        for n, part in enumerate(pieces, 1):
            await asyncio.sleep(0)
            lp = None if k is None else [(100 + n, -0.5 * n, [(200 + j, -0.1 * j) for j in range(k)])]
            yield Delta(part, self.finish if n == len(pieces) else None, 11, n, 0, lp)


def _client(tiny_moe, fake, **settings) -> openai.AsyncOpenAI:
    app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024,
                                      **settings), client_factory=lambda: fake)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter")
    return openai.AsyncOpenAI(base_url="http://adapter/v1", api_key="none", http_client=http, max_retries=0)


def _run(coro):
    return asyncio.run(coro)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_are_rendered_parsed_and_streamed_like_openai(tiny_moe):
    fake = FakeTriton(THOUGHT_AND_CALL.split("</think>\n\n", 1)[1])
    ai = _client(tiny_moe, fake)

    async def both():
        whole = await ai.chat.completions.create(model="tiny-moe", messages=USER, tools=TOOLS)
        calls, content, reasons = {}, "", []
        async for ch in await ai.chat.completions.create(model="tiny-moe", messages=USER, tools=TOOLS, stream=True):
            c = ch.choices[0]
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        return whole, calls, content, reasons

    whole, calls, content, reasons = _run(both())
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and reasons[-1] == "tool_calls"
    [call] = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    assert msg.content == "Let me check.\n" == content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris", "unit": "C"})]
    # the template put the tool list in front of the model
    tok = Tokenizer(tiny_moe)
    kind, _, ids, _ = fake.sent[0]
    prompt = tok.decode(ids)
    assert kind == "llm" and "<tools>" in prompt and '"name": "get_weather"' in prompt


def test_tool_choice_none_hides_the_tools_and_parses_nothing(tiny_moe):
    fake = FakeTriton('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    ai = _client(tiny_moe, fake)
    out = _run(ai.chat.completions.create(model="tiny-moe", messages=USER, tools=TOOLS, tool_choice="none"))
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content.startswith("<tool_call>")
    assert "<tools>" not in Tokenizer(tiny_moe).decode(fake.sent[0][2])


def test_a_tool_result_renders_back_for_the_model(tiny_moe):
    fake = FakeTriton("It is 18 C.")
    ai = _client(tiny_moe, fake)
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}]
    out = _run(ai.chat.completions.create(model="tiny-moe", messages=history, tools=TOOLS))
    assert out.choices[0].message.content == "It is 18 C."
    prompt = Tokenizer(tiny_moe).decode(fake.sent[0][2])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in prompt


def test_reasoning_is_split_from_the_answer(tiny_moe):
    fake = FakeTriton("<think>\nThe user greets me.</think>\n\nHello!")
    ai = _client(tiny_moe, fake, reasoning_parser="qwen3")

    async def both():
        whole = await ai.chat.completions.create(model="tiny-moe", messages=USER)
        parts = {"reasoning": "", "content": ""}
        async for ch in await ai.chat.completions.create(model="tiny-moe", messages=USER, stream=True):
            d = ch.choices[0].delta
            parts["reasoning"] += getattr(d, "reasoning_content", None) or ""
            parts["content"] += d.content or ""
        return whole, parts

    whole, parts = _run(both())
    msg = whole.choices[0].message
    assert msg.content == "Hello!" == parts["content"]
    assert msg.reasoning_content == "The user greets me." == parts["reasoning"]
    # without the parser the text is the model's, untouched
    plain = _run(_client(tiny_moe, fake).chat.completions.create(model="tiny-moe", messages=USER))
    assert plain.choices[0].message.content == fake.output


@pytest.mark.parametrize("cut", range(1, 9))
def test_streamed_parsing_matches_whole_parsing_at_any_cut(cut):
    """Tags split across deltas anywhere: the deltas add up to the non-streamed message."""
    whole = parse_whole(THOUGHT_AND_CALL, True, True, True)
    p = OutputParser(True, True, True)
    deltas = []
    for i in range(0, len(THOUGHT_AND_CALL), cut):
        deltas += p.feed(THOUGHT_AND_CALL[i:i + cut])
    deltas += p.finish()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"] == \
        "Paris is a city.\nI should call the tool."
    assert "".join(d.get("content", "") for d in deltas) == whole["content"] == "Let me check.\n"
    args = "".join(tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls", []))
    assert json.loads(args) == json.loads(whole["tool_calls"][0]["function"]["arguments"])


def test_chat_template_kwargs_reach_the_template(tiny_moe, tmp_path):
    """A Thinking-style template switch: enable_thinking false renders an empty think block, and the
    prompt then does not end inside <think>."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_moe, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    template = (ckpt / "chat_template.jinja").read_text()
    (ckpt / "chat_template.jinja").write_text(template + "{%- if add_generation_prompt and enable_thinking is "
                                              "defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    fake = FakeTriton("Hi.")
    ai = _client(ckpt, fake)
    _run(ai.chat.completions.create(model="tiny-moe", messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}}))
    _run(ai.chat.completions.create(model="tiny-moe", messages=USER))
    tok = Tokenizer(ckpt)
    off, on = (tok.decode(s[2]) for s in fake.sent)
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


def test_n_choices_each_with_its_own_seed(tiny_moe):
    fake = FakeTriton("seed {seed}")
    ai = _client(tiny_moe, fake)
    out = _run(ai.chat.completions.create(model="tiny-moe", messages=USER, n=3, seed=40, temperature=1.0))
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == ["seed 40", "seed 41", "seed 42"]
    assert out.usage.prompt_tokens == 11 and out.usage.completion_tokens == sum(
        len(range(0, len(f"seed {s}"), 3)) for s in (40, 41, 42))

    async def streamed():
        texts = {}
        async for ch in await ai.chat.completions.create(model="tiny-moe", messages=USER, n=3, seed=40, stream=True):
            for c in ch.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        return texts

    assert _run(streamed()) == {0: "seed 40", 1: "seed 41", 2: "seed 42"}


def test_continuous_usage_and_models_card(tiny_moe):
    fake = FakeTriton("abcdefghi")
    ai = _client(tiny_moe, fake)

    async def go():
        usages = []
        async for ch in await ai.chat.completions.create(model="tiny-moe", messages=USER, stream=True,
                                                          stream_options={"include_usage": True,
                                                                          "continuous_usage_stats": True}):
            usages.append(ch.usage.completion_tokens if ch.usage else None)
        models = await ai.models.list()
        return usages, models, await ai.models.retrieve("tiny-moe")

    usages, models, one = _run(go())
    assert None not in usages and usages[-1] == 3 and usages == sorted(usages)
    assert models.data[0].id == "tiny-moe" and models.data[0].max_model_len == 1024
    assert one.model_dump() == models.data[0].model_dump()       # OpenAI's retrieve (SGLang has it too)
    with pytest.raises(openai.NotFoundError) as e:
        _run(ai.models.retrieve("Qwen/Qwen3-VL-8B-Instruct"))
    assert "does not exist" in e.value.message and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("extra,status,message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "elsewhere"}}}, 400,
     "not among the tools"),
    ({"tool_choice": "required"}, 400, "tool_choice needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "always"}, 400, "tool_choice must be"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "needs {'json_schema'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "cannot both constrain"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "tools[0] must be"),
    ({"tools": "get_weather"}, 400, "'tools' must be a list"),
    ({"n": 0}, 400, "'n' must be an integer from 1 to 16"),
    ({"n": 17}, 400, "'n' must be an integer from 1 to 16"),
    ({"chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs may not set ['messages']"),
    ({"chat_template_kwargs": "x"}, 400, "'chat_template_kwargs' must be an object"),
    ({"parallel_tool_calls": "yes"}, 400, "'parallel_tool_calls' must be a boolean"),
    ({"top_logprobs": 3}, 400, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "'top_logprobs' must be an integer from 0 to 20"),
    ({"best_of": 2}, 400, "'best_of' is not supported"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, 400,
     "only one constraint on the output per request; got response_format and guided_regex"),
    ({"regex": "a+", "structured_outputs": {"choice": ["a"]}}, 400, "got regex and structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "{}"}}, 400, "structured_outputs.structural_tag is not supported"),
    ({"structured_outputs": ["json"]}, 400, "'structured_outputs' must be an object"),
    ({"tools": TOOLS, "tool_choice": "required", "ebnf": 'root ::= "x"'}, 400, "cannot both constrain"),
    ({"continue_final_message": True}, 400, "continue_final_message and add_generation_prompt cannot both be true"),
    ({"add_generation_prompt": "no"}, 400, "'add_generation_prompt' must be a boolean"),
    ({"continue_final_message": True, "add_generation_prompt": False}, 400,
     "continue_final_message needs the last message to be the assistant's"),
    ({"include_stop_str_in_output": 1}, 400, "include_stop_str_in_output must be a boolean"),
    ({"use_beam_search": True}, 400, "'use_beam_search' is not supported"),
    ({"chat_template": "{{ 7 * 7 }}"}, 400, "'chat_template' is not supported"),
    ({"echo": True}, 400, "'echo' is not supported"),
    ({"prompt_logprobs": 2}, 400, "'prompt_logprobs' is not supported"),
    ({"bad_words": ["x"]}, 400, "'bad_words' is not supported"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias must map"),
    ({"logit_bias": {"-5": 1}}, 400, "logit_bias must map"),
])
def test_malformed_feature_requests_get_a_clear_400(tiny_moe, extra, status, message):
    ai = _client(tiny_moe, FakeTriton("x"))
    with pytest.raises(openai.APIStatusError) as e:
        _run(ai.chat.completions.create(model="tiny-moe", messages=USER, extra_body=extra))
    assert e.value.status_code == status and message in e.value.message


def test_completions_prompts_echo_n_and_stream(tiny_moe):
    fake = FakeTriton("<{seed}>")
    ai = _client(tiny_moe, fake)
    tok = Tokenizer(tiny_moe)

    async def go():
        one = await ai.completions.create(model="tiny-moe", prompt="Once upon a time", echo=True, max_tokens=5)
        many = await ai.completions.create(model="tiny-moe", prompt=["A", [9707, 11]], n=2, seed=3, max_tokens=5)
        streamed = {}
        async for ch in await ai.completions.create(model="tiny-moe", prompt="Hi", n=2, seed=3, stream=True):
            for c in ch.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
        return one, many, streamed

    one, many, streamed = _run(go())
    assert one.object == "text_completion" and one.choices[0].text == "Once upon a time<None>"
    assert [c.text for c in many.choices] == ["<3>", "<4>", "<3>", "<4>"]       # prompt-major, n per prompt
    sent = [s[2] for s in fake.sent[1:5]]
    assert sent[0] == sent[1] == tok.encode("A") and sent[2] == sent[3] == [9707, 11]
    assert many.usage.prompt_tokens == len(tok.encode("A")) + 2
    assert streamed == {0: "<3>", 1: "<4>"}


@pytest.mark.parametrize("extra,message", [
    ({"prompt": "x", "suffix": "y"}, "'suffix' is not supported"),
    ({"prompt": "x", "logprobs": 21}, "'logprobs' must be an integer from 0 to 20"),
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": [1.5]}, "'prompt' must be a string"),
    ({"prompt": [[]]}, "'prompt' must be a string"),
    ({"prompt": "x", "echo": "yes"}, "'echo' must be a boolean"),
    ({"prompt": [10**9]}, "prompt token ids must be in [0, "),
])
def test_malformed_completions_get_a_clear_400(tiny_moe, extra, message):
    ai = _client(tiny_moe, FakeTriton("x"))
    with pytest.raises(openai.APIStatusError) as e:
        _run(ai.completions.create(model="tiny-moe", **{"prompt": None, **extra}))
    assert e.value.status_code == 400 and message in e.value.message


def test_logprobs_are_shaped_as_openai_shapes_them(tiny_moe):
    """Chat: logprobs.content per token with top_logprobs, streamed with the chunks that carry the
    tokens; completions: tokens / token_logprobs / top_logprobs / text_offset."""
    fake = FakeTriton("abcdef")                 # two deltas, one token each
    ai = _client(tiny_moe, fake)
    tok = Tokenizer(tiny_moe)

    async def go():
        whole = await ai.chat.completions.create(model="tiny-moe", messages=USER, logprobs=True, top_logprobs=2)
        streamed = []
        async for ch in await ai.chat.completions.create(model="tiny-moe", messages=USER, logprobs=True,
                                                          top_logprobs=2, stream=True):
            if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content:
                streamed += ch.choices[0].logprobs.content
        plain = await ai.chat.completions.create(model="tiny-moe", messages=USER)
        comp = await ai.completions.create(model="tiny-moe", prompt="x", logprobs=1)
        return whole, streamed, plain, comp

    whole, streamed, plain, comp = _run(go())
    content = whole.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in content] == [(tok.decode([101], skip_special_tokens=False), -0.5),
                                                       (tok.decode([102], skip_special_tokens=False), -1.0)]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [[0.0, -0.1]] * 2
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert plain.choices[0].logprobs is None and "logprobs" not in fake.sent[2][3]
    assert fake.sent[0][3]["logprobs"] == 2
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs == [-0.5, -1.0] and lp.text_offset == [0, len(lp.tokens[0])]
    assert [list(t.values()) for t in lp.top_logprobs] == [[0.0], [0.0]]


def test_forced_tool_choice_and_response_format_become_grammars(tiny_moe):
    """tool_choice required / a named function and response_format reach the engine as
    structured_output; the grammar names the tools and embeds their parameter schemas."""
    fake = FakeTriton('<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>')
    ai = _client(tiny_moe, fake)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = _run(ai.chat.completions.create(model="tiny-moe", messages=USER, tools=TOOLS, tool_choice="required"))
    _run(ai.chat.completions.create(model="tiny-moe", messages=USER, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                    parallel_tool_calls=True))
    _run(ai.chat.completions.create(model="tiny-moe", messages=USER, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}))
    _run(ai.chat.completions.create(model="tiny-moe", messages=USER, response_format={"type": "json_object"}))
    required, named, js, obj = (s[3]["structured_output"] for s in fake.sent)
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "<tool_call>" in required["grammar"] and '"const": "get_weather"' in required["grammar"]
    assert '("\\n" call)*' in required["grammar"] and '("\\n" call)*' not in named["grammar"]   # a named call: one
    assert js == {"json_schema": schema} and obj == {"json_object": True}


class SlowFirstToken(FakeTriton):
    async def _deltas(self, sampling):
        await asyncio.sleep(0.05)                  # the ensemble's time to a first token
        async for d in super()._deltas(sampling):
            yield d


@pytest.mark.parametrize("stream", [True, False])
def test_chat_responses_carry_the_adapters_own_timestamps(tiny_moe, stream):
    """Server-Timing: the adapter's phases in ms, so a client's TTFT splits into HTTP, the
    adapter, and the ensemble (`first`: Triton to the first token; `generate` without streaming)."""
    app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024),
                     client_factory=lambda: SlowFirstToken("Hello there."))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as h:
            r = await h.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": USER, "stream": stream})
            assert r.status_code == 200, r.text
            return r.headers["server-timing"]

    phases = {}
    for part in _run(go()).split(", "):
        name, dur = part.split(";dur=")
        phases[name] = float(dur)
    last = "first" if stream else "generate"
    assert list(phases) == ["read", "parse", "media", "prompt", last]
    assert all(v >= 0 for v in phases.values()) and phases[last] >= 45
    assert sum(v for k, v in phases.items() if k != last) < 1000


def test_media_urls_leave_the_json_as_the_media_input(tiny_moe):
    """The adapter sends a chat's media urls as the ensemble's `media` input and names them in
    the JSON ("media-input:N", in order; the part's options stay), so preprocess parses only
    what is left; a text part that also holds an `image` key stays text."""
    fake = FakeTriton("A cat.")
    ai = _client(tiny_moe, fake)
    uris = ["data:image/png;base64," + "A" * 64, "data:image/jpeg;base64," + "B" * 64]
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uris[0], "max_pixels": 4096}},
                                         {"type": "text", "text": "and", "image": "not media"},
                                         {"type": "image_url", "image_url": {"url": uris[1]}}]}]
    out = _run(ai.chat.completions.create(model="tiny-moe", messages=msgs))
    assert out.choices[0].message.content == "A cat."
    kind, _, sent, _ = fake.sent[0]
    parts = sent["messages"][0]["content"]
    assert kind == "ensemble" and fake.media == uris
    assert parts[0] == {"type": "image_url", "image_url": {"url": "media-input:0", "max_pixels": 4096}}
    assert parts[1] == msgs[0]["content"][1]
    assert parts[2]["image_url"]["url"] == "media-input:1"
    assert "base64" not in json.dumps(sent)


def test_deeply_nested_json_is_a_400_everywhere_it_is_parsed(tiny_moe):
    """Python's json recurses once per level, so '[' * 100000 raised RecursionError: a 500 from
    the adapter, from preprocess (a direct Triton client's text_input or sampling_parameters) and
    from a structured_output schema given as a string. A number of 5000 digits raised int()'s
    ValueError, not a JSONDecodeError: a 500 too. Each is the client's mistake: a 400."""
    from qwen3vl_backend.engine.structured import grammar_for
    from qwen3vl_backend.errors import RequestError
    from qwen3vl_backend.serving.preprocess import parse_json_object

    deep = "[" * 100_000
    app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024),
                     client_factory=lambda: FakeTriton("x"))

    async def post(body: str):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as http:
            return await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})

    for body in (deep, '{"messages": ' + deep, "[" * 200_000 + "]" * 200_000):    # small and large bodies
        r = _run(post(body))
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    huge = '{"model": "tiny-moe", "max_tokens": 1' + "0" * 5000 + "}"   # past int()'s 4300 digits: ValueError
    r = _run(post(huge))
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    for what in ("text_input", "sampling_parameters"):
        with pytest.raises(RequestError, match=f"{what} is not valid JSON: nested too deeply"):
            parse_json_object(deep, what)
        with pytest.raises(RequestError, match=f"{what} is not valid JSON: Exceeds the limit"):
            parse_json_object(huge, what)
    with pytest.raises(RequestError, match="json_schema is nested too deeply"):
        grammar_for({"json_schema": deep})


def test_a_grammar_that_matches_nothing_is_refused_before_admission(tiny_moe):
    """A schema or grammar can compile and still match no string; llguidance finds out only at the
    first mask, where the engine took it as a failure of its own mid-request (the probe's
    `{"$ref": "#"}` was a 500). It is refused when the request is added, as the client's; grammars
    that match something keep their first mask."""
    import numpy as np

    from qwen3vl_backend.engine.structured import Constraint
    from qwen3vl_backend.errors import RequestError

    vocab = json.loads((tiny_moe / "config.json").read_text())["text_config"]["vocab_size"]
    for spec in ({"json_schema": {"$ref": "#"}}, {"grammar": "start: start start"},
                 {"regex": "[^\\x00-\\U0010ffff]"}):
        with pytest.raises(RequestError, match="admits no output"):
            Constraint(spec, tiny_moe, vocab, [0])
    for spec, message in (({"choice": []}, "structured_output choice must be a non-empty list of strings"),
                          ({"regex": 5}, "structured_output regex must be a non-empty string")):
        with pytest.raises(RequestError) as e:          # said once, not inside "does not compile: ..."
            Constraint(spec, tiny_moe, vocab, [0])
        assert str(e.value) == message
    for spec in ({"json_schema": {"type": "integer"}}, {"regex": "yes|no"}, {"choice": ["a", "b"]}):
        c = Constraint(spec, tiny_moe, vocab, [0])
        again = Constraint(spec, tiny_moe, vocab, [0])
        first = c.allowed()
        assert c.failed is None and not c.done and np.unpackbits(first.view(np.uint8)).sum() > 0
        assert np.array_equal(first, again.allowed())


def test_vllm_and_sglang_constraint_fields_become_structured_output(tiny_moe):
    """What vLLM's and SGLang's users send to constrain an answer (guided_*, structured_outputs,
    SGLang's regex / json_schema / ebnf) reaches the engine as its one structured_output, on chat
    and on completions; unset (null / false) fields and structured_outputs' tuning keys constrain
    nothing. Before, all of them were ignored: free text, answered as if constrained."""
    fake = FakeTriton("x")
    ai = _client(tiny_moe, fake)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"guided_json": schema}, {"json_schema": schema}),
        ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
        ({"regex": "b+", "guided_json": None}, {"regex": "b+"}),
        ({"json_schema": json.dumps(schema)}, {"json_schema": json.dumps(schema)}),
        ({"ebnf": 'root ::= "yes"'}, {"grammar": 'root ::= "yes"'}),
        ({"structured_outputs": {"json": schema, "disable_any_whitespace": True, "regex": None}},
         {"json_schema": schema}),
        ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
        ({"structured_outputs": {"grammar": "start: \"a\"", "json_object": False}}, {"grammar": "start: \"a\""}),
        ({"structured_outputs": {}}, None),
    ]

    async def go():
        for extra, _ in cases:
            await ai.chat.completions.create(model="tiny-moe", messages=USER, extra_body=extra)
        for extra, _ in cases[:3]:
            await ai.completions.create(model="tiny-moe", prompt="Once", max_tokens=3, extra_body=extra)
        await ai.completions.create(model="tiny-moe", prompt="Once", max_tokens=3,
                                    extra_body={"response_format": {"type": "json_object"}})
    _run(go())
    sent = [s[3].get("structured_output") for s in fake.sent]
    assert sent == [want for _, want in cases] + [want for _, want in cases[:3]] + [{"json_object": True}]
    assert [s[0] for s in fake.sent[-4:]] == ["llm"] * 4       # completions go to llm with the same sampling


def test_vllm_prompt_end_and_stop_fields_reach_the_engine(tiny_moe):
    """vLLM's add_generation_prompt / continue_final_message shape the prompt's end, on the text
    path (ids rendered in the adapter) and the media path (the JSON preprocess renders); its
    skip_special_tokens and include_stop_str_in_output reach the engine's sampling. Before, all
    four were ignored."""
    from conftest import data_uri, image_bytes, make_image

    fake = FakeTriton("x")
    ai = _client(tiny_moe, fake)
    prefill = [*USER, {"role": "assistant", "content": "The weather in Paris is"}]
    opened = {"continue_final_message": True, "add_generation_prompt": False}

    async def go():
        await ai.chat.completions.create(model="tiny-moe", messages=USER)
        await ai.chat.completions.create(model="tiny-moe", messages=USER, extra_body={"add_generation_prompt": False})
        await ai.chat.completions.create(model="tiny-moe", messages=prefill, extra_body=opened)
        await ai.chat.completions.create(model="tiny-moe", messages=USER, stop=["Par"], logit_bias={"9": -100},
                                         extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True})
        image = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(32, 32, 1)))}}
        await ai.chat.completions.create(model="tiny-moe", extra_body=opened, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "Describe."}]}, prefill[-1]])
    _run(go())
    tok = Tokenizer(tiny_moe)
    default, closed, continued = (tok.decode(s[2], skip_special_tokens=False) for s in fake.sent[:3])
    assert default.endswith("<|im_start|>assistant\n")
    assert closed == default[: -len("<|im_start|>assistant\n")] and closed.endswith("<|im_end|>\n")
    assert continued == closed + "<|im_start|>assistant\nThe weather in Paris is"
    sampling = fake.sent[3][3]
    assert sampling["skip_special_tokens"] is False and sampling["include_stop_str_in_output"] is True
    assert sampling["logit_bias"] == {"9": -100}
    trimmed = _run(ai.chat.completions.create(model="tiny-moe", messages=USER, extra_body={"no_stop_trim": True}))
    assert trimmed and fake.sent[-1][3]["include_stop_str_in_output"] is True          # SGLang's name for it
    kind, _, sent, _ = fake.sent[4]
    assert kind == "ensemble" and sent["continue_final_message"] is True and sent["add_generation_prompt"] is False


def test_tokenize_and_detokenize_as_vllm_answers_them(tiny_moe):
    """vLLM's /tokenize (a prompt, or a text-only chat rendered as the chat endpoint renders it) and
    /detokenize; what they cannot answer (a chat with media, ids outside the vocabulary, both or
    neither of prompt and messages) is a 400."""
    from conftest import data_uri, image_bytes, make_image

    fake = FakeTriton("x")
    app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024),
                     client_factory=lambda: fake)
    tok = Tokenizer(tiny_moe)
    prefill = [*USER, {"role": "assistant", "content": "It is"}]
    image = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(32, 32, 1)))}}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as http:
            def post(path, body):
                return http.post(path, json=body)
            out = [await post("/tokenize", {"model": "tiny-moe", "prompt": "Hello world", "return_token_strs": True}),
                   await post("/tokenize", {"messages": USER}),
                   await post("/tokenize", {"messages": prefill, "continue_final_message": True,
                                            "add_generation_prompt": False})]
            await http.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": USER})
            await http.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": prefill,
                                                          "continue_final_message": True,
                                                          "add_generation_prompt": False})
            ids = out[1].json()["tokens"]
            out.append(await post("/detokenize", {"tokens": ids}))
            bad = [await post("/tokenize", {"messages": [{"role": "user", "content": [image]}]}),
                   await post("/tokenize", {"prompt": "x", "messages": USER}),
                   await post("/tokenize", {}),
                   await post("/tokenize", {"prompt": [1, 2]}),
                   await post("/tokenize", {"prompt": "x", "model": "other"}),
                   await post("/detokenize", {"tokens": [1, tok.vocab_size]}),
                   await post("/detokenize", {"tokens": [True]}),
                   await post("/detokenize", {"tokens": "1 2"})]
            return out, bad
    (plain, chat, continued, text), bad = _run(go())
    assert plain.json() == {"count": 2, "max_model_len": 1024, "tokens": tok.encode("Hello world"),
                            "token_strs": [tok.id_to_token(t) for t in tok.encode("Hello world")]}
    assert chat.json()["tokens"] == fake.sent[0][2] and chat.json()["count"] == len(fake.sent[0][2])
    assert continued.json()["tokens"] == fake.sent[1][2] and chat.json()["token_strs"] is None
    assert text.json()["prompt"] == tok.decode(fake.sent[0][2], skip_special_tokens=False)
    assert text.json()["prompt"].startswith("<|im_start|>user\n")
    assert [r.status_code for r in bad] == [400, 400, 400, 400, 404, 400, 400, 400], [r.text for r in bad]
    assert "text-only chats" in bad[0].json()["error"]["message"]


def test_sglang_generate_maps_its_fields_and_answers_in_its_shapes(tiny_moe):
    """SGLang's native /generate: text prompts are tokenized here and go to llm, prompts with
    image_data go through the ensemble with the `image` input; SGLang's sampling names become the
    engine's (max_new_tokens defaults to SGLang's 128); a batch and n answer a list in prompt-major
    order; streams carry the text so far, as SGLang's do; fields not served are a 400."""
    from conftest import data_uri, image_bytes, make_image

    fake = FakeTriton("abcdefg")
    app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024),
                     client_factory=lambda: fake)
    tok = Tokenizer(tiny_moe)
    image = data_uri(image_bytes(make_image(32, 32, 1)))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as http:
            one = await http.post("/generate", json={"text": "Hi there", "rid": "r1", "sampling_params": {
                "max_new_tokens": 5, "temperature": 0, "no_stop_trim": True, "min_new_tokens": 1, "stream_interval": 4,
                "ebnf": 'root ::= "a"'}})
            batch = await http.post("/generate", json={
                "text": ["A", "<|vision_start|><|image_pad|><|vision_end|>What?"], "image_data": [None, image],
                "sampling_params": [{"n": 2, "sampling_seed": 7}, {}], "return_logprob": True, "top_logprobs_num": 2,
                "return_text_in_logprobs": True})
            ids = await http.post("/generate", json={"input_ids": [[1, 2, 3]],
                                                     "sampling_params": {"max_new_tokens": 3}})
            async with http.stream("POST", "/generate", json={"text": "Hi", "stream": True}) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            bad = [await http.post("/generate", json=b) for b in (
                {"text": "x", "input_ids": [1]}, {}, {"text": ""}, {"input_ids": [1, "2"]},
                {"text": "x", "sampling_params": {"max_tokens": 3}},
                {"text": "x", "sampling_params": {"regex": "a", "json_schema": "{}"}},
                {"text": "x", "sampling_params": {"custom_params": {"a": 1}}},
                {"text": "x", "logprob_start_len": 0}, {"text": "x", "input_embeds": [[0.1]]},
                {"input_ids": [1], "image_data": image}, {"text": "{x", "image_data": image},
                {"text": ["a", "b"], "image_data": [image]}, {"text": "x", "sampling_params": {"n": 17}},
                {"text": "x", "top_logprobs_num": 21}, {"input_ids": [1, 10**9]},
                {"text": "x", "sampling_params": {"temperature": -1}})]
            return one, batch, ids, events, bad
    one, batch, ids, events, bad = _run(go())
    assert one.status_code == 200, one.text
    answer = one.json()
    assert answer["text"] == "abcdefg" and answer["meta_info"]["id"] == "r1"
    assert answer["meta_info"]["finish_reason"] == {"type": "stop"} and answer["meta_info"]["completion_tokens"] == 3
    kind, rid, sent_ids, sampling = fake.sent[0]
    assert kind == "llm" and rid != "r1" and len(rid) == 32 and sent_ids == tok.encode("Hi there")   # ours
    assert sampling == {"max_tokens": 5, "temperature": 0, "include_stop_str_in_output": True, "min_tokens": 1,
                        "structured_output": {"grammar": 'root ::= "a"'}}
    assert batch.status_code == 200, batch.text
    a, b, c = batch.json()
    assert [s[0] for s in fake.sent[1:4]] == ["llm", "llm", "ensemble"]
    assert [s[3].get("seed") for s in fake.sent[1:3]] == [7, 8] and fake.sent[1][3]["max_tokens"] == 128
    assert fake.sent[3][2] == "<|vision_start|><|image_pad|><|vision_end|>What?" and fake.images == [image]
    assert a["meta_info"]["output_token_logprobs"][0] == [-0.5, 101, tok.decode([101], skip_special_tokens=False)]
    assert a["meta_info"]["output_top_logprobs"][0] == [[0.0, 200, tok.decode([200], skip_special_tokens=False)],
                                                        [-0.1, 201, tok.decode([201], skip_special_tokens=False)]]
    assert fake.sent[4][0] == "llm" and fake.sent[4][2] == [1, 2, 3] and isinstance(ids.json(), list)
    texts = [json.loads(e[6:])["text"] for e in events[:-1]]
    assert events[-1] == "data: [DONE]" and texts == ["abc", "abcdef", "abcdefg"]      # the text so far
    assert json.loads(events[-2][6:])["meta_info"]["finish_reason"] == {"type": "stop"}
    assert [r.status_code for r in bad] == [400] * len(bad), [r.text for r in bad]
    assert "temperature must be" in bad[-1].json()["error"]["message"]
    named = _run(_post_generate(app, {"text": "x", "sampling_params": {"max_new_tokens": 0, "no_stop_trim": 1}}))
    assert "max_new_tokens must be a positive integer" in named.json()["error"]["message"]      # the caller's name
    assert len(fake.sent) == 6                                                      # none of them ran


def test_sglang_health_generate_and_model_info(tiny_moe):
    """/health_generate answers 200 only once `llm` has generated a token (one greedy token of a
    tiny prompt), 503 when that fails; /get_model_info names what is served."""
    from openai_frontend.triton_client import TritonRequestError

    class Broken(FakeTriton):
        async def _deltas(self, sampling):
            raise TritonRequestError("internal error in llm", False)
            yield

    async def go(fake):
        app = create_app(FrontendSettings(served_model_name="tiny-moe", model_path=str(tiny_moe), max_model_len=1024),
                         client_factory=lambda: fake)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as http:
            return await http.get("/health_generate"), await http.get("/get_model_info")
    fake = FakeTriton("x")
    (ok, info), (broken, _) = _run(go(fake)), _run(go(Broken("x")))
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert fake.sent[0][0] == "llm" and fake.sent[0][3] == {"max_tokens": 1, "temperature": 0}
    assert broken.status_code == 503 and broken.json()["status"] == "unavailable"
    assert info.json() == {"model_path": str(tiny_moe), "tokenizer_path": str(tiny_moe),
                           "served_model_name": "tiny-moe", "is_generation": True, "max_model_len": 1024}


async def _post_generate(app, body):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as http:
        return await http.post("/generate", json=body)
