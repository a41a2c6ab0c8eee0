"""A streamed answer split into a tool call's pieces or content (server/openai_tool_stream.py),
fed in every way a tokenizer might cut it."""

from __future__ import annotations

import json
import random

import pytest

from loraserve.server.openai_tool_stream import CallStream

ARGS = '{"q": "a } \\" {", "n": [1, {"x": null}], "b": true}'
CALL = '{"name": "search", "arguments": ' + ARGS + "}"


def cuts(text: str, seed: int) -> list[str]:
    """`text` in random pieces of 1-4 characters."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(text[i : i + n])
        i += n
    return out


def run(pieces: list[str], allowed: list[str]) -> list[dict]:
    s = CallStream(allowed)
    out = [d for p in pieces for d in s.push(p)]
    return out + s.flush()


@pytest.mark.parametrize("seed", range(5))
def test_a_call_streams_its_head_then_argument_fragments(seed: int) -> None:
    deltas = run(cuts(CALL, seed), ["other", "search"])
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "search", "arguments": ""}
    frags = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
    assert "".join(frags) == ARGS  # the call's own closing brace is not part of the arguments
    assert len(frags) > 5 and json.loads("".join(frags))["n"][1] == {"x": None}


def test_the_head_may_have_any_json_whitespace() -> None:
    text = ' {\n "name" : "search" ,"arguments":{"a": 1}}'
    deltas = run(list(text), ["search"])
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]) == '{"a": 1}'


@pytest.mark.parametrize(
    "text",
    [
        "Hello there",  # not JSON at all: content from the first piece
        '{"weather": 1}',  # JSON, not a call
        '{"name": "delete_all", "arguments": {}}',  # a tool that is not allowed
        '{"name": "sea',  # the answer ended before it could be told apart
    ],
)
def test_anything_else_is_content_and_nothing_is_lost(text: str) -> None:
    deltas = run(cuts(text, 1), ["search"])
    assert all(set(d) == {"content"} for d in deltas)
    assert "".join(d["content"] for d in deltas) == text


def test_free_text_is_not_held_back() -> None:
    s = CallStream(["search"])
    assert s.push("Sure") == [{"content": "Sure"}]
    assert s.push(", {") == [{"content": ", {"}]
    held = CallStream(["search"])
    assert held.push('{"na') == []  # could still be a call
    assert held.push("p") == [{"content": '{"nap'}]
