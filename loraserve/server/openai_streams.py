"""OpenAI's streamed answers: the server-sent events of `/v1/completions` and
`/v1/chat/completions` with `stream: true`.

Apart from the routes because a stream outlives its handler: the handler returns once the
concurrency slot is taken and the adapter resolved (so a bad adapter is still a 4xx, not a broken
stream), and the response then owns that slot until the last event, however the client leaves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from loraserve import __version__
from loraserve.server.errors import ApiError
from loraserve.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    openai_finish_reason,
    usage,
)
from loraserve.server.openai_text import StopAwareText
from loraserve.server.openai_tools import ToolPlan, tool_stream_events
from loraserve.server.sse import OPENAI_DONE, SlotStreamingResponse, openai_event
from loraserve.server.state import ServerState
from loraserve.server.validation import ValidatedRequest

#: `system_fingerprint` of every chat (and completion) response: OpenAI's "backend configuration"
#: marker, here the server's name and version (a seeded request repeats within one fingerprint).
SYSTEM_FINGERPRINT = f"loraserve-{__version__}"


async def _open_stream(st: ServerState, v: ValidatedRequest) -> Any:
    """Take the concurrency slot and resolve the adapter before the 200 goes out."""
    st.service.limiter.acquire()
    try:
        return await st.service.resolve_adapter(v)
    except BaseException:
        st.service.limiter.release()
        raise


async def _respond(
    st: ServerState, v: ValidatedRequest, events: Callable[[Any], AsyncIterator[str]]
) -> StreamingResponse:
    """A stream's events under its adapter, then `[DONE]`; a failure once the 200 is out becomes
    an error event in place of the rest. The response owns the slot `_open_stream` took, so it is
    released however the stream ends."""
    adapter = await _open_stream(st, v)

    async def framed() -> AsyncIterator[str]:
        try:
            async for event in events(adapter):
                yield event
            yield OPENAI_DONE
        except ApiError as e:
            yield openai_event({"error": {"message": e.message, "type": e.error_type}})

    return SlotStreamingResponse(framed(), st.service.limiter.release)


def _usage_only(head: dict[str, Any], v: ValidatedRequest, final: Any) -> str:
    """`stream_options.include_usage`: after the last choice, one chunk with no choices, only the usage."""
    return openai_event({**head, "choices": [], "usage": usage(len(v.prompt_ids), final.generated_tokens)})


async def _token_deltas(
    st: ServerState, v: ValidatedRequest, adapter: Any
) -> AsyncIterator[tuple[str, list, Any]]:
    """(visible text delta, tokens, final output or None) per engine step."""
    text = StopAwareText(v.params.stop)
    async for out in st.service.steps(v.prompt_ids, v.params, adapter):
        visible = [t for t in out.tokens if not t.special]
        delta = text.push("".join(t.text for t in visible))
        if out.finished:
            delta += text.finish(out.finish_reason == "stop_sequence")
        yield delta, visible, out if out.finished else None


async def stream_completion(
    st: ServerState, req: CompletionRequest, v: ValidatedRequest, cid: str, created: int, model: str
) -> StreamingResponse:
    async def events(adapter: Any) -> AsyncIterator[str]:
        head = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if req.echo:
            yield openai_event(
                {
                    **head,
                    "choices": [{"index": 0, "text": v.inputs, "logprobs": None, "finish_reason": None}],
                }
            )
        async for delta, tokens, final in _token_deltas(st, v, adapter):
            if not delta and final is None:
                continue
            choice = {
                "index": 0,
                "text": delta,
                "logprobs": completion_logprobs(tokens, 0) if req.logprobs is not None else None,
                "finish_reason": openai_finish_reason(final.finish_reason) if final else None,
            }
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if final is not None:  # LoRAX: the final chunk carries the usage
                chunk["usage"] = usage(len(v.prompt_ids), final.generated_tokens)
            yield openai_event(chunk)
            if final is not None and req.stream_options and req.stream_options.include_usage:
                yield _usage_only(head, v, final)

    return await _respond(st, v, events)


async def stream_chat(
    st: ServerState,
    req: ChatCompletionRequest,
    v: ValidatedRequest,
    cid: str,
    created: int,
    model: str,
    plan: ToolPlan | None = None,
) -> StreamingResponse:
    async def events(adapter: Any) -> AsyncIterator[str]:
        head = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if plan is not None and plan.choice != "none":
            deltas = _token_deltas(st, v, adapter)
            used = lambda f: usage(len(v.prompt_ids), f.generated_tokens)  # noqa: E731
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            tool_events = tool_stream_events(head, deltas, plan, openai_finish_reason, used, with_usage)
            async for event in tool_events:
                yield event
            return
        yield openai_event(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        async for delta, tokens, final in _token_deltas(st, v, adapter):
            if delta or (req.logprobs and tokens):
                yield openai_event(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": delta},
                                "logprobs": chat_logprobs(tokens) if req.logprobs else None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            if final is not None:  # LoRAX: the final chunk carries the usage
                yield openai_event(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": openai_finish_reason(final.finish_reason),
                            }
                        ],
                        "usage": usage(len(v.prompt_ids), final.generated_tokens),
                    }
                )
                if req.stream_options and req.stream_options.include_usage:
                    yield _usage_only(head, v, final)

    return await _respond(st, v, events)
