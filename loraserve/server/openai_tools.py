"""OpenAI chat `tools` / `tool_choice`: the tools go into the prompt, the answer into `tool_calls`.

- The tool definitions are rendered through the model's chat template when it mentions `tools`
  (transformers' `apply_chat_template(tools=...)`), otherwise as a short default system prompt.
- A call is the JSON object `{"name": <tool>, "arguments": {...}}`. With `tool_choice` `"required"`
  or a named function, the output is constrained (engine/grammar.py) to such a call of one of the
  allowed tools whose `arguments` match that tool's `parameters` schema.
- `"auto"` (the default with tools) does not constrain: the model answers freely, and an answer
  that is exactly such a call is returned as `tool_calls`, anything else as `content`. `"none"`
  renders the tools but never returns a call.
- Streaming sends a call as OpenAI does: a `delta.tool_calls` chunk with the id and name as soon
  as the name is generated, then the arguments' text in fragments as they are generated, then
  the finish chunk (`"tool_calls"`). With `"auto"`, text is held back only while it could still
  be the start of a call (`{"name": ...`), then streams as content (server/openai_tool_stream.py).
  A streamed `"auto"` call is recognised only in that order (name first); the whole answer,
  as the non-streamed response parses it, may also put `arguments` first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import grammar_text
from loraserve.engine.params import ResponseFormat
from loraserve.server.errors import validation_error
from loraserve.server.openai_tool_stream import CallStream
from loraserve.server.sse import openai_event

DEFAULT_TOOL_PROMPT = 'Tools: {tools}\nTo call one, answer {{"name": <tool>, "arguments": {{...}}}} only.'


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # the request's tools, as sent
    schemas: dict[str, dict]  # tool name -> its `parameters` schema
    choice: str  # "auto", "none", "required" or "function"
    allowed: list[str]  # the names a call may use

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    def call_schema(self) -> dict:
        """A call of one of the allowed tools with arguments matching its schema."""
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": n}, "arguments": self.schemas[n]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for n in self.allowed
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, response_format: Any) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (422 naming the field); None when the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise validation_error("`tool_choice` needs `tools`")
        return None
    if response_format and response_format.get("type") not in (None, "text"):
        raise validation_error("`response_format` cannot be used together with `tools`")
    schemas: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise validation_error(f"`tools[{i}]` must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise validation_error(f"`tools[{i}].function.name` must be a non-empty string")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise validation_error(f"`tools[{i}].function.parameters` must be a JSON schema object")
        try:
            grammar_text(ResponseFormat("json_schema", params))
        except RequestError as e:
            raise validation_error(f"`tools[{i}].function.parameters`: {e}") from None
        schemas[name] = params
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        choice = tool_choice or "auto"
        allowed = list(schemas)
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in schemas:
            raise validation_error(f"`tool_choice` names {name!r}, which is not one of `tools`")
        choice, allowed = "function", [name]
    else:
        raise validation_error(
            "`tool_choice` must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}"
        )
    return ToolPlan(tools=tools, schemas=schemas, choice=choice, allowed=allowed)


def tool_response_format(plan: ToolPlan) -> dict[str, Any] | None:
    """OpenAI `response_format` that constrains the answer to a call (None: free text)."""
    if not plan.constrained:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": plan.call_schema()}}


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], plan: ToolPlan | None) -> str:
    """The chat prompt, with the tools in it (through the template when it knows `tools`)."""
    if plan is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    template = tokenizer.chat_template or ""
    if "tools" in template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=plan.tools)
    text = DEFAULT_TOOL_PROMPT.format(
        tools=json.dumps([t["function"] for t in plan.tools], separators=(",", ":"))
    )
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0].get('content') or ''}\n\n{text}".strip()
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


def tool_calls(text: str, plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """The answer as OpenAI `tool_calls`, or None when it is not a call of an allowed tool."""
    if plan is None or plan.choice == "none":
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in plan.allowed:
        return None
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(args)},
        }
    ]


def chat_message(text: str, finish_reason: str | None, plan: ToolPlan | None) -> tuple[dict, str | None]:
    """(`message`, `finish_reason`) of one chat choice."""
    calls = tool_calls(text, plan) if finish_reason == "stop" else None
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


async def tool_stream_events(
    head: dict[str, Any],
    deltas: AsyncIterator[tuple[str, list, Any]],
    plan: ToolPlan,
    finish_reason: Any,
    final_usage: Any,
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """The chat chunks of a tool request: the call's head once its name is known, then the
    arguments' text fragment by fragment as they are generated (server/openai_tool_stream.py), or
    content when the answer is not a call; then the finish chunk with the usage."""

    def chunk(delta: dict, reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return openai_event({**head, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    stream = CallStream(plan.allowed)
    async for delta, _tokens, final in deltas:
        for d in stream.push(delta):
            yield chunk(d)
        if final is None:
            continue
        for d in stream.flush():
            yield chunk(d)
        reason = finish_reason(final.finish_reason)
        if stream.mode == "call" and reason == "stop":
            reason = "tool_calls"
        yield chunk({}, reason, usage=final_usage(final))
        if include_usage:
            yield openai_event({**head, "choices": [], "usage": final_usage(final)})
