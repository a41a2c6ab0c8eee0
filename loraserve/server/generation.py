"""Runs validated requests on the async engine and shapes the results as LoRAX responses.

Both the LoRAX routes and the OpenAI routes go through `GenerationService`, so
limits, adapters, metrics and error mapping behave the same on every API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.engine.errors import GenerationError, RequestError
from loraserve.engine.params import RequestOutput, SamplingParams, TokenInfo
from loraserve.server.adapter_registry import AdapterRegistry
from loraserve.server.errors import (
    ApiError,
    adapter_api_error,
    generation_error,
    internal_error,
    overloaded_error,
    validation_error,
)
from loraserve.server.metrics import ServerMetrics
from loraserve.server.schemas import (
    AlternativeToken,
    BestOfSequence,
    Details,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from loraserve.server.speculation import check_request_heads, tokens_per_step
from loraserve.server.validation import ValidatedRequest

log = logging.getLogger(__name__)

_LORAX_FINISH = {"length", "eos_token", "stop_sequence"}


@dataclass
class Completion:
    """Everything one finished sequence produced, accumulated over engine steps."""

    tokens: list[TokenInfo] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    finish_reason: str = "length"
    generated_text: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int | None = None
    spec_steps: int = 0  # Medusa verification steps, and the tokens they produced
    spec_tokens: int = 0

    @property
    def skipped_tokens(self) -> int:
        """Tokens accepted from speculative drafts (LoRAX's `Details.skipped_tokens`)."""
        return sum(t.skipped for t in self.tokens)

    @property
    def logprob_sum(self) -> float:
        return sum(wire_logprob(t.logprob) or 0.0 for t in self.tokens)


@dataclass
class RequestStats:
    """When a request passed each stage and what it produced, for LoRAX's `x-*` response headers.

    Times are `time.perf_counter()` seconds. The engine's own scheduling wait is not visible from
    here, so it counts towards time to first token rather than queue time; queue time is the wait
    for the adapter (load, merge) between validation and the engine.
    """

    start: float = field(default_factory=time.perf_counter)  # the route received the request
    validated: float | None = None
    submitted: float | None = None  # handed to the engine
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    skipped_tokens: int = 0


class ConcurrencyLimiter:
    """LoRAX's `--max-concurrent-requests`, counted in sequences: beyond it a request gets 429 at once.

    A request takes one unit per sequence it runs (`best_of`, OpenAI's `n` x prompts), because
    each sequence costs the engine as much as a request of its own: counted as one, a single
    request with n=3000 would take one slot and run 3,000 sequences.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self, sequences: int = 1, what: str = "`best_of`") -> None:
        """Take `sequences` units; `what` names the fields that multiply up to them, for the 422
        a request gets when it could never fit (429 would invite a retry that cannot succeed)."""
        if sequences > self.limit:
            raise validation_error(
                f"{what} asks for {sequences} sequences, more than this server runs at once "
                f"(--max-concurrent-requests {self.limit})"
            )
        if self.in_flight + sequences > self.limit:
            raise overloaded_error()
        self.in_flight += sequences

    def release(self, sequences: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - sequences)


#: What a logprob of -inf (or NaN, should a processor ever produce one) is reported as. JSON has no
#: literal for either (Python writes `NaN`, which clients reject); vLLM reports -9999.0 the same way.
LOGPROB_FLOOR = -9999.0


def wire_logprob(lp: float | None) -> float | None:
    """A logprob every JSON parser accepts: finite, at least `LOGPROB_FLOOR`; None stays None."""
    if lp is None:
        return None
    if math.isnan(lp):
        return LOGPROB_FLOOR
    return min(max(lp, LOGPROB_FLOOR), 0.0)


def finish_reason(reason: str | None) -> str:
    return reason if reason in _LORAX_FINISH else "length"


def to_token(t: TokenInfo) -> Token:
    alts = None
    if t.alternatives is not None:
        alts = [AlternativeToken(id=i, text=text, logprob=wire_logprob(lp)) for i, text, lp in t.alternatives]
    return Token(
        id=t.id,
        text=t.text,
        logprob=wire_logprob(t.logprob) if t.logprob is not None else 0.0,
        special=t.special,
        alternative_tokens=alts,
        skipped=t.skipped,  # the engine marks tokens accepted from speculative drafts
    )


def to_prefill(tokens: list[TokenInfo]) -> list[PrefillToken]:
    return [PrefillToken(id=t.id, text=t.text, logprob=wire_logprob(t.logprob)) for t in tokens]


class GenerationService:
    def __init__(
        self, aengine: Any, registry: AdapterRegistry, metrics: ServerMetrics, max_concurrent: int
    ) -> None:
        self.aengine = aengine
        self.registry = registry
        self.metrics = metrics
        self.limiter = ConcurrencyLimiter(max_concurrent)

    async def resolve_adapter(self, v: ValidatedRequest) -> LoraAdapter | None:
        """The request's adapter; a merge is built off the event loop and then runs like any adapter."""
        self.metrics.request_validated(len(v.prompt_ids), v.params.max_new_tokens)
        try:
            if v.merge is not None:
                adapter = await self.registry.resolve_merged(v.merge, v.adapter_source, v.api_token)
            else:
                adapter = await self.registry.resolve(v.adapter_id, v.adapter_source, v.api_token)
        except AdapterError as e:
            raise adapter_api_error(e) from e
        refusal = check_request_heads(self.aengine.engine, adapter)
        if refusal is not None:
            raise validation_error(refusal)
        if v.merge is not None:
            for adapter_id in dict.fromkeys(v.merge.ids):
                self.metrics.adapter_request(adapter_id)
        else:
            self.metrics.adapter_request(
                v.adapter_id or self.registry.static_adapter_id or "", adapter, private=bool(v.api_token)
            )
        return adapter

    async def steps(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoraAdapter | None,
        stats: RequestStats | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs with errors raised and metrics recorded; closing it aborts the request.

        `stats`, when given, gets the submit and first-token times (the first sequence's, for
        `best_of`).
        """
        start = time.perf_counter()
        if stats is not None and stats.submitted is None:
            stats.submitted = start
        first = True
        gen = self.aengine.generate(prompt_ids, params, adapter, request_id=uuid.uuid4().hex)
        async with contextlib.aclosing(gen):
            while True:
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except RequestError as e:  # the engine refused the request (limits, adapter fit)
                    raise validation_error(str(e)) from e
                except GenerationError as e:
                    raise generation_error(str(e)) from e
                except Exception as e:  # a bug: logged here, a bare 500 for the client
                    log.exception("request failed in the engine")
                    raise internal_error() from e
                self.metrics.request_output(out)
                if out.error:
                    raise generation_error(out.error)
                if out.tokens:
                    if first:
                        now = time.perf_counter()
                        self.metrics.ttft.observe(now - start)
                        if stats is not None and stats.first_token is None:
                            stats.first_token = now
                        first = False
                    self.metrics.tokens_generated(len(out.tokens))
                yield out

    async def complete(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoraAdapter | None,
        stats: RequestStats | None = None,
    ) -> Completion:
        c = Completion()
        async for out in self.steps(prompt_ids, params, adapter, stats):
            c.tokens.extend(out.tokens)
            if out.prefill:
                c.prefill = list(out.prefill)
            if out.finished:
                c.finish_reason = finish_reason(out.finish_reason)
                c.generated_text = out.generated_text or ""
                c.prompt_tokens = out.prompt_tokens or len(prompt_ids)
                c.generated_tokens = out.generated_tokens or len(c.tokens)
                c.seed = out.seed
                c.spec_steps, c.spec_tokens = out.spec_steps, out.spec_tokens
        return c

    async def complete_many(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoraAdapter | None,
        n: int,
        stats: RequestStats | None = None,
    ) -> list[Completion]:
        """n sequences for one prompt, run concurrently so the engine batches them."""
        if n == 1:
            return [await self.complete(prompt_ids, params, adapter, stats)]
        runs = [self.complete(prompt_ids, _copy_params(params), adapter, stats) for _ in range(n)]
        return list(await asyncio.gather(*runs))

    @contextlib.asynccontextmanager
    async def slot(self, sequences: int = 1, what: str = "`best_of`") -> AsyncIterator[None]:
        """Hold `sequences` units of the concurrency limit while the body runs (see `ConcurrencyLimiter`)."""
        self.limiter.acquire(sequences, what)
        try:
            yield
        finally:
            self.limiter.release(sequences)

    # -- LoRAX responses -----------------------------------------------------------------
    async def generate(self, v: ValidatedRequest, stats: RequestStats | None = None) -> GenerateResponse:
        """The LoRAX answer; `stats` (optional) is filled for the response headers."""
        async with self.slot(v.best_of):
            adapter = await self.resolve_adapter(v)
            results = await self.complete_many(v.prompt_ids, v.params, adapter, v.best_of, stats)
        best = max(results, key=lambda c: c.logprob_sum)
        if stats is not None:
            stats.finished = time.perf_counter()
            stats.prompt_tokens = best.prompt_tokens
            stats.generated_tokens = best.generated_tokens
            stats.skipped_tokens = best.skipped_tokens
        text = (v.inputs + best.generated_text) if v.return_full_text else best.generated_text
        # LoRAX: `details || decoder_input_details` (the prefill is part of the details)
        if not (v.details or v.decoder_input_details):
            return GenerateResponse(generated_text=text)
        others = None
        if v.best_of > 1:
            others = [
                BestOfSequence(
                    generated_text=(v.inputs + c.generated_text) if v.return_full_text else c.generated_text,
                    finish_reason=c.finish_reason,
                    generated_tokens=c.generated_tokens,
                    seed=c.seed if v.params.do_sample else None,
                    prefill=to_prefill(c.prefill) if v.decoder_input_details else [],
                    tokens=_tokens(c),
                )
                for c in results
                if c is not best
            ]
        details = Details(
            finish_reason=best.finish_reason,
            prompt_tokens=best.prompt_tokens,
            generated_tokens=best.generated_tokens,
            skipped_tokens=best.skipped_tokens,
            seed=best.seed if v.params.do_sample else None,
            prefill=to_prefill(best.prefill) if v.decoder_input_details else [],
            tokens=_tokens(best),
            best_of_sequences=others,
            speculative_tokens_per_step=tokens_per_step(best.spec_steps, best.spec_tokens),
        )
        return GenerateResponse(generated_text=text, details=details)

    async def stream(self, v: ValidatedRequest, adapter: LoraAdapter | None) -> AsyncIterator[StreamResponse]:
        """One event per token; the last carries the full text and, when asked, the details.

        The caller holds the concurrency slot for the whole stream.
        """
        last: TokenInfo | None = None
        async for out in self.steps(v.prompt_ids, v.params, adapter):
            tokens = list(out.tokens)
            if out.finished and not tokens:
                # The final step accepted no new token: close with an empty special token.
                tokens = [TokenInfo(id=last.id if last else 0, text="", logprob=0.0, special=True)]
            for i, t in enumerate(tokens):
                last = t
                final = out.finished and i == len(tokens) - 1
                if not final:
                    yield StreamResponse(token=to_token(t))
                    continue
                text = out.generated_text or ""
                details = None
                if v.details:
                    details = StreamDetails(
                        finish_reason=finish_reason(out.finish_reason),
                        prompt_tokens=out.prompt_tokens or len(v.prompt_ids),
                        generated_tokens=out.generated_tokens,
                        seed=out.seed if v.params.do_sample else None,
                        speculative_tokens_per_step=tokens_per_step(out.spec_steps, out.spec_tokens),
                    )
                yield StreamResponse(
                    token=to_token(t),
                    generated_text=(v.inputs + text) if v.return_full_text else text,
                    details=details,
                )


def _tokens(c: Completion) -> list[Token]:
    return [to_token(t) for t in c.tokens]


def _copy_params(p: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(p, stop=list(p.stop))


__all__ = ["ApiError", "Completion", "GenerationService"]
