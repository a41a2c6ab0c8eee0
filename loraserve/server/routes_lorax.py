"""LoRAX's REST routes: `/generate`, `/generate_stream` and the client's `/`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraserve.server.errors import ApiError
from loraserve.server.schemas import (
    CompatGenerateRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
)
from loraserve.server.sse import SlotStreamingResponse, lorax_event
from loraserve.server.state import ServerState, get_state
from loraserve.server.validation import bearer_token, validate_generate_async

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


async def _generate(st: ServerState, body: GenerateRequest, authorization: str | None) -> dict[str, Any]:
    v = await validate_generate_async(
        body, st.config, st.limits, st.tokenizer, stream=False, header_token=bearer_token(authorization)
    )
    with st.metrics.request_duration.labels(route="generate").time():
        return wire_dict(await st.service.generate(v))


async def _stream(st: ServerState, body: GenerateRequest, authorization: str | None) -> StreamingResponse:
    v = await validate_generate_async(
        body, st.config, st.limits, st.tokenizer, stream=True, header_token=bearer_token(authorization)
    )
    st.service.limiter.acquire()  # 429 before any byte of the stream is sent
    try:
        adapter = await st.service.resolve_adapter(v)
    except BaseException:
        st.service.limiter.release()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            async for event in st.service.stream(v, adapter):
                yield lorax_event(wire_dict(event))
        except ApiError as e:  # headers are gone: the error travels as an event, as in LoRAX
            yield lorax_event(e.to_dict())

    return SlotStreamingResponse(events(), st.service.limiter.release)


@router.post(
    "/generate", response_model=GenerateResponse, responses=_ERRORS, summary="Generate tokens (LoRAX)"
)
async def generate(
    body: GenerateRequest, request: Request, authorization: str | None = Header(default=None)
) -> JSONResponse:
    return JSONResponse(await _generate(get_state(request), body, authorization))


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
async def compat_generate(
    body: CompatGenerateRequest, request: Request, authorization: str | None = Header(default=None)
) -> Any:
    st = get_state(request)
    if body.stream:
        return await _stream(st, body, authorization)
    return JSONResponse([await _generate(st, body, authorization)])
