"""LoRAX's REST routes: `/generate`, `/generate_stream`, the client's `/` and SageMaker's `/invocations`."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraserve.server.errors import ApiError
from loraserve.server.generation import RequestStats
from loraserve.server.schemas import (
    CompatGenerateRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
)
from loraserve.server.sse import SlotStreamingResponse, lorax_event
from loraserve.server.state import ServerState, get_state
from loraserve.server.validation import ValidatedRequest, bearer_token, validate_generate_async

router = APIRouter(tags=["LoRAX"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (400, "Bad request"),
        (404, "Adapter not found"),
        (422, "Input validation error"),
        (424, "Generation error"),
        (429, "Model is overloaded"),
    )
}
_OPTIONAL_NULL_KEYS = ("details", "best_of_sequences", "alternative_tokens", "speculative_tokens_per_step")


def wire_dict(model: GenerateResponse | StreamResponse) -> dict[str, Any]:
    """LoRAX omits `details`, `best_of_sequences` and `alternative_tokens` when absent but keeps other nulls.

    `speculative_tokens_per_step` (ours) is left out unless the request was speculated.
    """

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not (k in _OPTIONAL_NULL_KEYS and v is None)}
        if isinstance(obj, list):
            return [strip(x) for x in obj]
        return obj

    data = strip(model.model_dump())
    if isinstance(model, StreamResponse):
        data.setdefault("details", None)  # the stream always carries the key
    return data


_UNSAFE_HEADER_CHARS = re.compile(r"[^\x20-\x7e]")


def _header_value(text: str) -> str:
    """A header value every HTTP stack accepts: printable ASCII, anything else percent-escaped.

    Adapter ids and model ids are caller- or operator-chosen strings (local paths may hold any
    Unicode); a raw control character or non-Latin-1 character would fail the whole response.
    """
    return _UNSAFE_HEADER_CHARS.sub(lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8")), text)


def _ms(seconds: float) -> str:
    """LoRAX sends durations as whole milliseconds (`as_millis()`)."""
    return str(int(max(seconds, 0.0) * 1000))


def _common_headers(st: ServerState, v: ValidatedRequest | None, inputs: str) -> dict[str, str]:
    """The headers LoRAX sends on every generate route, streams included.

    `x-adapter-id`/`x-adapter-source` only when the request named an adapter (merged ids joined by
    commas, as LoRAX joins them). Never the request's token: only ids and the source go out.
    """
    headers = {
        "x-compute-type": "cpu+optimized" if st.config.device.startswith("cpu") else "gpu+optimized",
        "x-compute-characters": str(len(inputs)),
        "x-model-id": _header_value(st.config.model_id),
    }
    if v is not None:
        ids = list(v.merge.ids) if v.merge is not None else [v.adapter_id] if v.adapter_id else []
        if ids:
            headers["x-adapter-id"] = _header_value(",".join(ids))
            headers["x-adapter-source"] = v.adapter_source or st.config.default_adapter_source
    return headers


def _generate_headers(st: ServerState, v: ValidatedRequest, stats: RequestStats) -> dict[str, str]:
    """LoRAX's timing and token-count headers of a finished `/generate` (router/src/server.rs)."""
    end = stats.finished or time.perf_counter()
    validated = stats.validated or stats.start
    submitted = stats.submitted or validated
    first = stats.first_token or end
    inference = end - submitted
    generated = max(stats.generated_tokens, 1)  # LoRAX divides by it; an empty answer must not fail
    ttft = first - submitted
    return {
        **_common_headers(st, v, v.inputs),
        "x-compute-time": _ms(end - stats.start),
        "x-total-time": _ms(end - stats.start),
        "x-validation-time": _ms(validated - stats.start),
        "x-queue-time": _ms(submitted - validated),
        "x-inference-time": _ms(inference),
        "x-time-per-token": _ms(inference / generated),
        "x-time-to-first-token": _ms(ttft),
        "x-time-per-output-token": _ms((inference - ttft) / max(stats.generated_tokens - 1, 1)),
        "x-prompt-tokens": str(stats.prompt_tokens),
        "x-generated-tokens": str(stats.generated_tokens),
        "x-skipped-tokens": str(stats.skipped_tokens),
        "x-total-tokens": str(stats.prompt_tokens + stats.generated_tokens),
    }


async def _generate(
    st: ServerState, body: GenerateRequest, authorization: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The response body and LoRAX's headers for it."""
    stats = RequestStats()
    v = await validate_generate_async(
        body, st.config, st.limits, st.tokenizer, stream=False, header_token=bearer_token(authorization)
    )
    stats.validated = time.perf_counter()
    response = wire_dict(await st.service.generate(v, stats))
    return response, _generate_headers(st, v, stats)


def _stream_headers(st: ServerState, v: ValidatedRequest | None, inputs: str) -> dict[str, str]:
    """LoRAX's stream headers: sent before any token, so no timings or counts."""
    return {**_common_headers(st, v, inputs), "X-Accel-Buffering": "no"}


def _error_stream(
    st: ServerState, error: ApiError, v: ValidatedRequest | None, inputs: str
) -> StreamingResponse:
    """LoRAX answers a stream that fails before its first token with HTTP 200 and one error event
    (`data:{"error", "error_type"}`); `lorax-client` reads the error type from the event."""

    async def one() -> AsyncIterator[str]:
        yield lorax_event(error.to_dict())

    return StreamingResponse(
        one(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **_stream_headers(st, v, inputs)},
    )


async def _stream(st: ServerState, body: GenerateRequest, authorization: str | None) -> StreamingResponse:
    """An SSE stream. Errors before the first token (validation, adapter loading) are an error
    event on a 200 stream, as in LoRAX; only overload stays an HTTP 429, so load balancers and
    retrying clients still see it as a status."""
    try:
        v = await validate_generate_async(
            body, st.config, st.limits, st.tokenizer, stream=True, header_token=bearer_token(authorization)
        )
    except ApiError as e:
        return _error_stream(st, e, None, body.inputs)
    st.service.limiter.acquire()  # 429 before any byte of the stream is sent
    try:
        adapter = await st.service.resolve_adapter(v)
    except ApiError as e:
        st.service.limiter.release()
        return _error_stream(st, e, v, body.inputs)
    except BaseException:
        st.service.limiter.release()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            async for event in st.service.stream(v, adapter):
                yield lorax_event(wire_dict(event))
        except ApiError as e:  # headers are gone: the error travels as an event, as in LoRAX
            yield lorax_event(e.to_dict())

    return SlotStreamingResponse(events(), st.service.limiter.release, _stream_headers(st, v, v.inputs))


@router.post(
    "/generate", response_model=GenerateResponse, responses=_ERRORS, summary="Generate tokens (LoRAX)"
)
async def generate(
    body: GenerateRequest, request: Request, authorization: str | None = Header(default=None)
) -> JSONResponse:
    response, headers = await _generate(get_state(request), body, authorization)
    return JSONResponse(response, headers=headers)


@router.post(
    "/generate_stream",
    response_model=StreamResponse,
    responses=_ERRORS,
    summary="Generate a stream of tokens as Server-Sent Events (LoRAX)",
)
async def generate_stream(
    body: GenerateRequest, request: Request, authorization: str | None = Header(default=None)
) -> StreamingResponse:
    return await _stream(get_state(request), body, authorization)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    responses=_ERRORS,
    summary="LoRAX client route: `stream` picks SSE or a one-element JSON array",
)
@router.post(
    "/invocations",
    response_model=list[GenerateResponse],
    responses=_ERRORS,
    summary="SageMaker's inference route: the same as `POST /`",
)
async def compat_generate(
    body: CompatGenerateRequest, request: Request, authorization: str | None = Header(default=None)
) -> Any:
    st = get_state(request)
    if body.stream:
        return await _stream(st, body, authorization)
    response, headers = await _generate(st, body, authorization)
    return JSONResponse([response], headers=headers)
