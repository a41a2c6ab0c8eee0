"""OpenAI request bodies (the subset of fields LoRAX and the `openai` client send) and response helpers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraserve.engine.params import TokenInfo
from loraserve.server.errors import not_supported, validation_error
from loraserve.server.generation import wire_logprob
from loraserve.server.schemas import CheckedBody, MergedAdapters, ResponseFormat


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(CheckedBody):
    """Fields common to completions and chat, plus LoRAX's extensions (`top_k`, `adapter_source`, ...)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # LoRAX extensions
    repetition_penalty: float | None = None
    top_k: int | None = None
    ignore_eos_token: bool | None = None
    adapter_source: Literal["hub", "local", "s3", "pbase"] | None = None
    api_token: str | None = None
    # LoRAX's per-request merge (`extra_body`); `model` then names the base model.
    merged_adapters: MergedAdapters | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def openai_response_format(rf: dict[str, Any] | None) -> ResponseFormat | None:
    """OpenAI's `response_format` as LoRAX's: `{"type": "json_object"}` (any JSON object; a LoRAX
    `schema` is honoured too), `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`
    (the schema is always enforced, `strict` or not), `{"type": "text"}`. 422 naming the field."""
    if rf is None:
        return None
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = rf.get("schema")
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise validation_error("`response_format.json_schema.schema` must be a JSON schema object")
        schema = spec["schema"]
    else:
        raise validation_error("`response_format.type` must be one of `text`, `json_object`, `json_schema`")
    if schema is not None and not isinstance(schema, dict):
        raise validation_error("`response_format` schema must be a JSON object")
    return ResponseFormat(type=kind, schema=schema)


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def chat_text(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise not_supported(f"chat content part of type {part.get('type')!r}")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        out.append({**m.model_dump(exclude_none=True), "content": content or ""})
    return out


def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [wire_logprob(t.logprob) for t in tokens],
        "top_logprobs": [{text: wire_logprob(lp) for _, text, lp in (t.alternatives or [])} for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    def entry(text: str, lp: float | None) -> dict[str, Any]:
        return {
            "token": text,
            "logprob": wire_logprob(lp) if lp is not None else 0.0,
            "bytes": list(text.encode("utf-8", errors="replace")),
        }

    return {
        "content": [
            {
                **entry(t.text, t.logprob),
                "top_logprobs": [entry(text, lp) for _, text, lp in (t.alternatives or [])],
            }
            for t in tokens
            if not t.special
        ]
    }
