"""LoRAX's routes besides generation: the probes orchestrators call and `/tokenize`.

LoRAX's router serves health on `GET /` and SageMaker's `GET /ping` as well as `/health`, a
Kubernetes startup probe on `/startup`, and `POST /tokenize`; deployments written for LoRAX point
their probes at these paths, so they must answer here too.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loraserve.engine.params import SamplingParams
from loraserve.server.errors import ApiError
from loraserve.server.routes_info import health
from loraserve.server.schemas import ErrorResponse, SimpleToken, TokenizeRequest
from loraserve.server.state import get_state

router = APIRouter(tags=["Server"])

#: LoRAX's startup probe prompt (router/src/server.rs `is_startup_ready`).
_STARTUP_PROMPT = "Who?"


@router.get("/", summary="Health (LoRAX serves it on `/` too): 200 while the engine runs")
async def root_health(request: Request) -> Response:
    return await health(request)


@router.get("/ping", summary="SageMaker's health route: the same as `/health`")
async def ping(request: Request) -> Response:
    return await health(request)


@router.get(
    "/startup",
    summary="Kubernetes startup probe: 200 once the model has generated a token",
    responses={500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def startup(request: Request) -> Response:
    """Like LoRAX, a one-token generation proves the whole path (tokenizer, engine, step loop).

    LoRAX also fails on an empty text; a tiny or untrained model may well answer with a special
    token, so here the probe only needs a token. A server at its concurrency limit is answering
    requests, so it is started: that is a 200 too, without adding a sequence to the batch.
    """
    st = get_state(request)
    alive = await health(request)
    if alive.status_code != 200:
        return alive
    ids = st.tokenizer.encode(_STARTUP_PROMPT)
    try:
        async with st.service.slot():
            done = await st.service.complete(ids, SamplingParams(max_new_tokens=1), None)
    except ApiError as e:
        if e.status_code == 429:
            return Response(status_code=200)
        return JSONResponse({"error": e.message, "error_type": e.error_type}, status_code=500)
    if done.generated_tokens < 1:
        return JSONResponse(
            {"error": "Empty generation", "error_type": "failed healthcheck"}, status_code=500
        )
    return Response(status_code=200)


@router.post("/tokenize", response_model=list[SimpleToken], summary="Tokenize a text (LoRAX)")
async def tokenize(body: TokenizeRequest, request: Request) -> list[SimpleToken]:
    """The model's tokens for `inputs`, each with its vocabulary entry and character offsets.

    `tokenizers`' Python binding reports offsets in characters (LoRAX's `encode_char_offsets`),
    so `inputs[start:stop]` is the token's text. Runs off the event loop: a megabyte of text
    takes a noticeable time to tokenize.
    """
    st = get_state(request)
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    backend = st.tokenizer.backend
    enc = await asyncio.to_thread(backend.encode, body.inputs, add_special_tokens=add_special)
    return [
        SimpleToken(id=i, text=backend.id_to_token(i) or "", start=start, stop=stop)
        for i, (start, stop) in zip(enc.ids, enc.offsets, strict=True)
    ]
