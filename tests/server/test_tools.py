"""Chat `tools` / `tool_choice` through the `openai` client (server/openai_tools.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from loraserve.server.openai_tools import plan_tools, render_prompt
from tests.fixtures.server import ServerProcess

jsonschema = pytest.importorskip("jsonschema")

# small: the tiny test model's context is 512 tokens of a byte-level vocabulary
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "u": {"enum": ["c", "f"]}},
    "required": ["city", "u"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
SCHEMAS = {"weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, tool_choice: Any, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 90)  # the tools prompt is ~420 of the tiny model's 512 tokens
    return client.chat.completions.create(
        model="", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, temperature=0, **kw
    )


def check_call(call: Any, names: tuple[str, ...]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [({"type": "function", "function": {"name": "add"}}, ("add",)), ("required", ("weather", "add"))],
)
def test_forced_call(client: openai.OpenAI, tool_choice: Any, names: tuple[str, ...]) -> None:
    c = chat(client, tool_choice)
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], names)


def test_sampled_forced_call(client: openai.OpenAI) -> None:
    c = client.chat.completions.create(
        model="", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=90, seed=4, n=2
    )
    for choice in c.choices:
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0], ("weather", "add"))


def test_auto_and_none_answer_free_text_or_a_call(client: openai.OpenAI) -> None:
    auto = chat(client, "auto", max_tokens=8).choices[0]
    if auto.message.tool_calls:
        assert auto.finish_reason == "tool_calls"
        check_call(auto.message.tool_calls[0], ("weather", "add"))
    else:
        assert isinstance(auto.message.content, str)
    none = chat(client, "none", max_tokens=8).choices[0]
    assert none.message.tool_calls is None and isinstance(none.message.content, str)
    assert none.finish_reason in ("stop", "length")


def streamed_calls(chunks: list[Any]) -> tuple[Any, list[str]]:
    """The first `delta.tool_calls` entry and the argument fragments of all of them."""
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and all(tc.index == 0 for tc in calls)
    return calls[0], [tc.function.arguments for tc in calls]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "weather"}}, "required"])
def test_stream_forced_call_arguments_come_token_by_token(client: openai.OpenAI, tool_choice: Any) -> None:
    chunks = list(chat(client, tool_choice, stream=True, stream_options={"include_usage": True}))
    first, frags = streamed_calls(chunks)
    assert first.id.startswith("call_") and first.type == "function"
    assert first.function.name in ("weather", "add") and first.function.arguments == ""
    assert all(f for f in frags[1:]) and len(frags) > 2, frags  # several argument chunks
    args = "".join(frags)
    jsonschema.validate(json.loads(args), SCHEMAS[first.function.name])
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    ref = chat(client, tool_choice).choices[0].message.tool_calls[0]  # greedy: the same call
    assert ref.function.name == first.function.name
    assert json.loads(args) == json.loads(ref.function.arguments)


def test_stream_auto_is_content_or_a_streamed_call(client: openai.OpenAI) -> None:
    chunks = list(chat(client, "auto", stream=True, max_tokens=12))
    ref = chat(client, "auto", max_tokens=12).choices[0]
    if ref.message.tool_calls:  # the tiny model happened to call: the stream says so too
        first, frags = streamed_calls(chunks)
        assert first.function.name == ref.message.tool_calls[0].function.name
    else:
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == ref.message.content
        assert chunks[-1].choices[0].finish_reason == ref.finish_reason


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "wat"}}}]},
            "tools",
        ),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_422(server: ServerProcess, extra: dict, needle: str) -> None:
    body = {"model": "", "messages": MESSAGES, "tools": TOOLS, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert needle in r.text


class _Tok:
    def __init__(self, template: str) -> None:
        self.chat_template, self.calls = template, []

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **kw: Any) -> str:
        self.calls.append((messages, kw))
        return "prompt"


def test_tools_go_through_the_template_when_it_knows_them() -> None:
    plan = plan_tools(TOOLS, "auto", None)
    tok = _Tok("{% if tools %}{{ tools }}{% endif %}")
    render_prompt(tok, MESSAGES, plan)
    assert tok.calls[0][1]["tools"] == TOOLS and tok.calls[0][0] == MESSAGES
    plain = _Tok("{{ messages }}")
    render_prompt(plain, [{"role": "system", "content": "be brief"}, *MESSAGES], plan)
    msgs, kw = plain.calls[0]
    assert "tools" not in kw and msgs[0]["role"] == "system" and '"weather"' in msgs[0]["content"]
    assert msgs[0]["content"].startswith("be brief") and msgs[1:] == MESSAGES
