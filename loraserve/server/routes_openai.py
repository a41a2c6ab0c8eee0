"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

They reuse LoRAX's validation and limits (a request is a LoRAX request with an
OpenAI coat) and add what OpenAI clients expect: choices, usage, stop
sequences cut off, `[DONE]`-terminated streams (openai_streams.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from loraserve.server.errors import not_supported, validation_error
from loraserve.server.generation import Completion
from loraserve.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    _OpenAIBase,
    chat_logprobs,
    chat_text,
    completion_logprobs,
    openai_finish_reason,
    openai_response_format,
    usage,
)
from loraserve.server.openai_streams import SYSTEM_FINGERPRINT, stream_chat, stream_completion
from loraserve.server.openai_text import cut_at_stop
from loraserve.server.openai_tools import (
    chat_message,
    plan_tools,
    render_prompt,
    tool_response_format,
)
from loraserve.server.schemas import GenerateParameters, GenerateRequest
from loraserve.server.state import ServerState, get_state
from loraserve.server.validation import (
    ValidatedRequest,
    bearer_token,
    check_prompt_chars,
    compile_off_loop,
    encode_off_loop,
    validate_generate,
)

router = APIRouter(prefix="/v1", tags=["OpenAI"])


def adapter_for_model(st: ServerState, model: str) -> str | None:
    """`model` names the adapter; the base model's id (or nothing) means no adapter."""
    return None if not model or model == st.config.model_id else model


def _refuse_unsupported(st: ServerState, req: _OpenAIBase) -> None:
    if req.logit_bias:
        raise not_supported("`logit_bias`")
    if req.n < 1:
        raise validation_error("`n` must be strictly positive")
    if req.n > st.config.max_best_of:
        # Each choice is a sequence of its own: `n` is LoRAX's `best_of` and shares its bound.
        raise validation_error(f"`n` must be > 0 and <= {st.config.max_best_of}. Given: {req.n}")
    if req.stream and req.n > 1:
        raise not_supported("`n` > 1 with `stream`")


def _parameters(
    st: ServerState,
    req: _OpenAIBase,
    max_tokens: int | None,
    top_n: int,
    *,
    sample_by_default: bool = False,
    candidates: int = 1,
) -> GenerateParameters:
    """OpenAI knobs onto LoRAX's. Temperature 0 is greedy. Without any knob, chat samples at
    temperature 1 (`sample_by_default`: OpenAI's default, which LoRAX's chat route follows) while
    completions stay greedy as LoRAX's `/generate` does. Several choices or `best_of` candidates
    (`candidates`) sample, else they would all be the same text."""
    greedy = req.temperature == 0
    top_p = None if greedy or req.top_p is None or req.top_p >= 1 else req.top_p
    top_k = None if greedy else req.top_k
    temperature = None if greedy else req.temperature
    knobs = temperature is not None or top_p is not None or top_k is not None
    sample = not greedy and (knobs or sample_by_default or req.n > 1 or candidates > 1)
    return GenerateParameters(
        adapter_id=adapter_for_model(st, req.model),
        adapter_source=req.adapter_source,
        merged_adapters=req.merged_adapters,
        api_token=req.api_token,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        do_sample=sample,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        max_new_tokens=max_tokens,
        ignore_eos_token=bool(req.ignore_eos_token),
        stop=req.stop_list(),
        seed=req.seed,
        details=True,
        return_k_alternatives=top_n or None,
        response_format=openai_response_format(req.response_format),
    )


def _validate(
    st: ServerState,
    req: _OpenAIBase,
    text: str,
    ids: list[int],
    max_tokens: int | None,
    top_n: int,
    authorization: str | None,
    *,
    sample_by_default: bool = False,
    candidates: int = 1,
) -> ValidatedRequest:
    params = _parameters(
        st, req, max_tokens, top_n, sample_by_default=sample_by_default, candidates=candidates
    )
    return validate_generate(
        GenerateRequest(inputs=text or " ", parameters=params),
        st.config,
        st.limits,
        st.tokenizer,
        stream=req.stream,
        header_token=bearer_token(authorization),
        prompt_ids=ids,
    )


def _visible_text(c: Completion, stops: list[str]) -> str:
    return cut_at_stop(c.generated_text, stops)


async def _run_choices(
    st: ServerState, v: ValidatedRequest, n: int, best_of: int | None = None
) -> list[Completion]:
    """n choices for one prompt; a fixed seed gives choice j the seed + j so choices differ.

    With `best_of` (OpenAI's: candidates generated server-side), `best_of` sequences run and the
    n with the highest cumulative logprob are returned, best first, as LoRAX picks its best_of.
    """
    runs_wanted = max(n, best_of or 1)
    adapter = await st.service.resolve_adapter(v)
    runs = []
    for j in range(runs_wanted):
        params = replace(v.params, stop=list(v.params.stop))
        if params.seed is not None:
            params.seed += j
        runs.append(st.service.complete(v.prompt_ids, params, adapter))
    done = list(await asyncio.gather(*runs))
    if runs_wanted == n:
        return done
    return sorted(done, key=lambda c: c.logprob_sum, reverse=True)[:n]


def _prompt_count(prompt: Any) -> int:
    """How many prompts `prompt` holds, counted before any of them is tokenized."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return 1
    return len(prompt)


async def _prompts(st: ServerState, prompt: Any) -> list[tuple[str, list[int]]]:
    """A completion prompt may be text, token ids, or a list of either.

    Text is bounded by characters and then tokenized off the event loop; token ids are bounded by
    count before they are decoded.
    """
    tok = st.tokenizer
    if isinstance(prompt, str):
        check_prompt_chars(prompt, st.limits, "prompt")
        return [(prompt, await encode_off_loop(tok, prompt, add_special_tokens=True))]
    if prompt and all(isinstance(x, int) for x in prompt):
        vocab = st.aengine.engine.model_config.vocab_size
        bad = next((x for x in prompt if not 0 <= x < vocab), None)
        if bad is not None:  # an id outside the embedding table would crash the whole batch's step
            raise validation_error(
                f"`prompt` token id {bad} is out of range: the vocabulary has ids 0..{vocab - 1}"
            )
        limit = st.limits.max_input_length
        if len(prompt) > limit:
            raise validation_error(f"`prompt` must have less than {limit} tokens. Given: {len(prompt)}")
        return [(tok.decode(prompt), list(prompt))]
    out = []
    for p in prompt:
        out.extend(await _prompts(st, p))
    if not out:
        raise validation_error("`prompt` cannot be empty")
    return out


@router.post("/completions", summary="OpenAI text completions")
async def completions(
    req: CompletionRequest, request: Request, authorization: str | None = Header(default=None)
) -> Any:
    st = get_state(request)
    if req.best_of is not None and not 0 < req.best_of <= st.config.max_best_of:
        raise validation_error(f"`best_of` must be > 0 and <= {st.config.max_best_of}. Given: {req.best_of}")
    _refuse_unsupported(st, req)
    if req.suffix:
        raise not_supported("`suffix`")
    best_of = req.n if req.best_of is None else req.best_of
    if best_of < req.n:
        # OpenAI: `best_of` candidates are generated and the best `n` returned, so it cannot be fewer.
        raise validation_error(f"`best_of` must be >= `n`. Given: best_of {best_of} and n {req.n}")
    if req.stream and best_of > 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens")
    count = _prompt_count(req.prompt)
    if count > st.config.max_prompts_per_request:
        raise validation_error(
            f"`prompt` holds {count} prompts, more than {st.config.max_prompts_per_request} per request "
            "(--max-prompts-per-request)"
        )
    if req.stream and count > 1:
        raise not_supported("several prompts with `stream`")
    prompts = await _prompts(st, req.prompt)
    await compile_off_loop(openai_response_format(req.response_format))
    # No `max_tokens`: up to the remaining context (`max_total_tokens` - input length), as LoRAX.
    top_n = req.logprobs or 0
    validated = [
        _validate(st, req, text, ids, req.max_tokens, top_n, authorization, candidates=best_of)
        for text, ids in prompts
    ]
    if best_of > 1 and not validated[0].params.do_sample:
        # LoRAX's rule: greedy candidates would all be the same text (temperature 0 here).
        raise validation_error("you must use sampling when `best_of` is > 1")
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model or st.config.model_id
    if req.stream:
        return await stream_completion(st, req, validated[0], cid, created, model)
    sequences = max(req.n, best_of) * len(validated)
    async with st.service.slot(sequences, "`n` (or `best_of`) x the prompts in `prompt`"):
        results = await asyncio.gather(*[_run_choices(st, v, req.n, best_of) for v in validated])
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for (text, _), v, comps in zip(prompts, validated, results, strict=True):
        prompt_tokens += len(v.prompt_ids)
        for c in comps:
            body = _visible_text(c, v.params.stop)
            prefix = text if req.echo else ""
            choices.append(
                {
                    "index": len(choices),
                    "text": prefix + body,
                    "logprobs": completion_logprobs(c.tokens, len(prefix))
                    if req.logprobs is not None
                    else None,
                    "finish_reason": openai_finish_reason(c.finish_reason),
                }
            )
            completion_tokens += c.generated_tokens
    return JSONResponse(
        {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


@router.post(
    "/chat/completions", summary="OpenAI chat completions (prompt built with the model's chat template)"
)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, authorization: str | None = Header(default=None)
) -> Any:
    st = get_state(request)
    _refuse_unsupported(st, req)
    plan = plan_tools(req.tools, req.tool_choice, req.response_format)
    if plan is not None and plan.constrained:
        req = req.model_copy(update={"response_format": tool_response_format(plan)})
    if not req.messages:
        raise validation_error("`messages` cannot be empty")
    try:
        prompt = await asyncio.to_thread(render_prompt, st.tokenizer, chat_text(req.messages), plan)
    except ValueError as e:
        raise validation_error(f"cannot build a chat prompt: {e}") from e
    except Exception as e:  # jinja errors from the template itself, e.g. raise_exception(...)
        raise validation_error(f"the model's chat template failed: {e}") from e
    check_prompt_chars(prompt, st.limits, "messages")
    ids = await encode_off_loop(st.tokenizer, prompt, add_special_tokens=False)
    await compile_off_loop(openai_response_format(req.response_format))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    v = _validate(st, req, prompt, ids, max_tokens, top_n, authorization, sample_by_default=True)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model or st.config.model_id
    if req.stream:
        return await stream_chat(st, req, v, cid, created, model, plan)
    async with st.service.slot(req.n, "`n`"):
        comps = await _run_choices(st, v, req.n)
    choices = []
    for j, c in enumerate(comps):
        message, reason = chat_message(
            _visible_text(c, v.params.stop), openai_finish_reason(c.finish_reason), plan
        )
        choices.append(
            {
                "index": j,
                "message": message,
                "logprobs": chat_logprobs(c.tokens) if req.logprobs else None,
                "finish_reason": reason,
            }
        )
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage(len(v.prompt_ids), sum(c.generated_tokens for c in comps)),
        }
    )


@router.get("/models", summary="The base model, the configured adapters and recently served public ones")
async def models(request: Request) -> dict[str, Any]:
    """Bounded and shareable: every caller sees this list, so it holds the base model, the
    operator's `--adapter-id`/`--preloaded-adapter-ids`, and the `--max-listed-adapters` most
    recently served public adapters by canonical id (one entry however a path was spelled).
    Adapters fetched with a caller's token (private hub repos, Predibase) are never listed."""
    st = get_state(request)
    created = int(st.metrics.started_at)
    base = st.config.model_id
    ids: dict[str, None] = {}
    for adapter_id in (st.config.adapter_id, *st.config.preloaded_adapter_ids, *st.metrics.listed_adapters()):
        if adapter_id and adapter_id != base:
            ids[adapter_id] = None
    data = [
        {
            "id": base,
            "object": "model",
            "created": created,
            "owned_by": "loraserve",
            "root": base,
            "parent": None,
        }
    ]
    for adapter_id in ids:
        data.append(
            {
                "id": adapter_id,
                "object": "model",
                "created": created,
                "owned_by": "loraserve",
                "root": adapter_id,
                "parent": base,
            }
        )
    return {"object": "list", "data": data}
