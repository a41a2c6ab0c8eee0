"""LoRAX's request validation (router/src/validation.rs), rule for rule and message for message.

Kept free of HTTP and engine state so it can be unit-tested with just a tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from loraserve.adapters.merge import MergeError, MergeSpec
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import grammar_text
from loraserve.engine.memory_plan import Limits
from loraserve.engine.params import (
    MIN_REPETITION_PENALTY,
    MIN_SAMPLING_TEMPERATURE,
    ResponseFormat,
    SamplingParams,
)
from loraserve.server.config import ServerConfig
from loraserve.server.errors import ApiError, validation_error
from loraserve.server.schemas import GenerateParameters, GenerateRequest
from loraserve.server.schemas import ResponseFormat as WireResponseFormat

#: A prompt longer than this many characters per allowed token is refused before it is tokenized.
#: Tokenizing costs ~1-2 s per MB on the request's thread; real text averages 3-5 characters per
#: token and the longest merges in common vocabularies (runs of spaces or symbols) stay well below
#: 32, so only a prompt that could never fit is refused this way. `truncate` changes nothing here:
#: LoRAX checks the input length on the untruncated prompt, so a prompt this long is refused anyway.
MAX_CHARS_PER_TOKEN = 32

#: OpenAI's (and LoRAX's router's) bound on `frequency_penalty` and `presence_penalty`.
MAX_ABS_PENALTY = 2.0


class TextEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def chat_messages(inputs: str) -> list[dict[str, Any]]:
    """`inputs` of a request with `apply_chat_template`: a JSON list of `{role, content}` messages,
    or else plain text, which is one user message (LoRAX accepts both)."""
    try:
        parsed = json.loads(inputs)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: plain text
        return [{"role": "user", "content": inputs}]
    if not isinstance(parsed, list):
        return [{"role": "user", "content": inputs}]  # e.g. a number or a quoted string: plain text
    for i, m in enumerate(parsed):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise validation_error(f"`inputs`: message {i} must be an object with a string `role`")
        if not isinstance(m.get("content", ""), str | None):
            raise validation_error(f"`inputs`: message {i} `content` must be a string")
    if not parsed:
        raise validation_error("`inputs` cannot be empty")
    return parsed


def render_chat(tokenizer: Any, inputs: str) -> str:
    """`inputs` through the model's chat template, with the generation prompt; 422 when the model
    has none or its template refuses the conversation (the chat route's rule)."""
    messages = chat_messages(inputs)
    render = getattr(tokenizer, "apply_chat_template", None)
    if render is None:
        raise validation_error("`apply_chat_template`: this model has no chat template")
    try:
        return render(messages, add_generation_prompt=True)
    except ValueError as e:
        raise validation_error(f"`apply_chat_template`: cannot build a chat prompt: {e}") from e
    except Exception as e:  # jinja errors from the template itself, e.g. raise_exception(...)
        raise validation_error(f"`apply_chat_template`: the model's chat template failed: {e}") from e


@dataclass
class ValidatedRequest:
    """A request the engine can run: token ids, sampling params and what to report back."""

    inputs: str
    prompt_ids: list[int]
    params: SamplingParams
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    adapter_id: str | None
    adapter_source: str | None  # None = not given: the server default applies
    api_token: str | None
    merge: MergeSpec | None = None  # `merged_adapters`; `adapter_source` and the token apply to every id


def bearer_token(authorization: str | None) -> str | None:
    """The token from `Authorization: Bearer <token>`; anything else carries no adapter token."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def max_prompt_chars(limits: Limits) -> int:
    """The character bound `check_prompt_chars` applies: `MAX_CHARS_PER_TOKEN` x `--max-input-length`."""
    return MAX_CHARS_PER_TOKEN * limits.max_input_length


def check_prompt_chars(text: str, limits: Limits, field: str = "inputs") -> None:
    """Refuse a prompt that cannot fit by its character count alone, before paying for tokenizing it."""
    bound = max_prompt_chars(limits)
    if len(text) > bound:
        raise validation_error(
            f"`{field}` must have less than {limits.max_input_length} tokens. Given: {len(text)} characters, "
            f"more than the {bound} ({MAX_CHARS_PER_TOKEN} per token) any prompt of that many tokens has"
        )


def implies_sampling(p: GenerateParameters) -> bool:
    """LoRAX's router rule: any sampling knob that is set turns `best_of` sampling on."""
    return bool(
        p.do_sample
        or p.temperature is not None
        or p.top_k is not None
        or p.top_p is not None
        or p.typical_p is not None
    )


def merge_spec(p: GenerateParameters) -> MergeSpec | None:
    """The request's merge, checked as LoRAX's router then its merge code check it (422 naming the field).

    Ranks can only be compared once the adapters are fetched; that check comes later.
    """
    if p.merged_adapters is None:
        return None
    if p.adapter_id:
        raise validation_error("at most one of `adapter_id` or `adapters` may be provided")
    ids, weights = p.merged_adapters.ids, p.merged_adapters.weights
    if len(ids) < 1:
        raise validation_error("at least one adapter ID must be provided when setting `adapters`")
    if len(ids) != len(weights):
        raise validation_error("number of adapter IDs must match number of adapter weights")
    try:
        return MergeSpec.from_request(p.merged_adapters.model_dump())
    except MergeError as e:
        raise validation_error(f"`merged_adapters`: {e}") from e


async def compile_off_loop(rf: WireResponseFormat | None) -> None:
    """Compile a response format's grammar on a worker thread (llguidance caches it), so the
    check in `response_format` below finds it compiled instead of compiling on the event loop.
    Errors are left for that check to report."""
    if rf is None or rf.type == "text" or (rf.type == "json_schema" and rf.schema_ is None):
        return
    try:
        await asyncio.to_thread(grammar_text, ResponseFormat(rf.type, rf.schema_))
    except RequestError:
        pass


def response_format(p: GenerateParameters) -> ResponseFormat | None:
    """The request's grammar constraint, its schema checked by llguidance now (422 naming
    `response_format`), so a bad schema never reaches the queue. `text` is no constraint."""
    rf = p.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema" and rf.schema_ is None:
        raise validation_error("`response_format`: `json_schema` needs a `schema`")
    fmt = ResponseFormat(rf.type, rf.schema_)
    try:
        grammar_text(fmt)
    except RequestError as e:
        raise validation_error(f"`response_format`: {str(e).removeprefix('response_format: ')}") from None
    return fmt


def check_best_of(best_of: int, cfg: ServerConfig, stream: bool) -> None:
    if cfg.max_best_of == 1 and best_of != 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    if best_of < 1 or best_of > cfg.max_best_of:
        raise validation_error(f"`best_of` must be > 0 and <= {cfg.max_best_of}. Given: {best_of}")
    if stream and best_of > 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens")


def _sampling_params(p: GenerateParameters) -> SamplingParams:
    """Defaults and range checks exactly as LoRAX applies them."""
    temperature = 1.0 if p.temperature is None else p.temperature
    if not math.isfinite(temperature):
        raise validation_error(f"`temperature` must be a finite number. Given: {temperature}")
    if temperature < 0:
        raise validation_error("`temperature` must be non-negative")
    # LoRAX's router accepts 0 and decodes greedily. Below float32's useful range logits /
    # temperature overflows (1e-300 is 0.0 in float32) and the distribution is the argmax anyway:
    # decode greedily there too, as vLLM does under 1e-5.
    tiny_temperature = temperature < MIN_SAMPLING_TEMPERATURE
    if tiny_temperature:
        temperature = 1.0
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if not math.isfinite(repetition_penalty):
        raise validation_error(f"`repetition_penalty` must be a finite number. Given: {repetition_penalty}")
    if repetition_penalty <= 0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    # logits / 1e-300 overflows float32 the same way; any penalty this small already ranks every
    # repeated token first, so the floor changes no choice.
    repetition_penalty = max(repetition_penalty, MIN_REPETITION_PENALTY)
    frequency_penalty = _penalty("frequency_penalty", p.frequency_penalty)
    presence_penalty = _penalty("presence_penalty", p.presence_penalty)
    # LoRAX's router keeps this message but accepts 1.0 (no filtering): only > 1.0 is refused.
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0 < p.typical_p < 1:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.return_k_alternatives is not None and p.return_k_alternatives <= 0:
        raise validation_error("`return_k_alternatives` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    if p.seed is not None and p.seed < 0:
        raise validation_error("`seed` must be a non-negative integer")
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    top_k = 0 if p.top_k is None else p.top_k
    # LoRAX's model server samples as soon as a warper differs from its neutral value.
    do_sample = p.do_sample or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
    if tiny_temperature:
        do_sample = False
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or 1,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        seed=p.seed,
        stop=[s for s in p.stop if s],
        ignore_eos_token=p.ignore_eos_token,
        logprobs=True,
        top_n_alternatives=p.return_k_alternatives or 0,
        prefill_logprobs=p.decoder_input_details,
        watermark=p.watermark,
        response_format=response_format(p),
    )


def _penalty(name: str, value: float | None) -> float:
    """OpenAI's frequency/presence penalty, with LoRAX's range and message (None: 0, no penalty)."""
    if value is None:
        return 0.0
    if not math.isfinite(value) or not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
        raise validation_error(f"`{name}` must be >= -2.0 and <= 2.0")
    return value


@dataclass
class _CheckedParameters:
    merge: MergeSpec | None
    best_of: int
    params: SamplingParams


def validate_generate(
    req: GenerateRequest,
    cfg: ServerConfig,
    limits: Limits,
    tokenizer: TextEncoder,
    *,
    stream: bool = False,
    header_token: str | None = None,
    prompt_ids: list[int] | None = None,
) -> ValidatedRequest:
    """Turn a LoRAX request into engine inputs, or raise a 422 `ApiError` naming the field.
    `limits`: what the engine resolved and enforces (`Engine.limits`).

    Tokenizes on the calling thread: the routes use `validate_generate_async` instead.
    """
    checked = _check_parameters(req, cfg, limits, stream)
    if prompt_ids is not None:  # OpenAI chat prompts and token-id prompts arrive already tokenized
        ids = list(prompt_ids)
    elif req.parameters.apply_chat_template:
        check_prompt_chars(req.inputs, limits)
        req = req.model_copy(update={"inputs": render_chat(tokenizer, req.inputs)})
        check_prompt_chars(req.inputs, limits)
        ids = tokenizer.encode(req.inputs, add_special_tokens=False)  # the template wrote the BOS
    else:
        check_prompt_chars(req.inputs, limits)
        ids = tokenizer.encode(req.inputs, add_special_tokens=True)
    return _with_prompt(req, checked, ids, limits, header_token)


async def validate_generate_async(
    req: GenerateRequest,
    cfg: ServerConfig,
    limits: Limits,
    tokenizer: TextEncoder,
    *,
    stream: bool = False,
    header_token: str | None = None,
) -> ValidatedRequest:
    """`validate_generate` for the event loop: every cheap check first, then the character bound,
    then tokenizing on a worker thread (the tokenizer releases the GIL), so a large prompt never
    holds up `/health` or anyone else's request."""
    await compile_off_loop(req.parameters.response_format)
    checked = _check_parameters(req, cfg, limits, stream)
    check_prompt_chars(req.inputs, limits)
    special = True
    if req.parameters.apply_chat_template:
        # Rendered off the loop like tokenizing; `inputs` becomes the prompt the model sees (and
        # what `return_full_text` prepends). The template writes the BOS itself.
        req = req.model_copy(update={"inputs": await asyncio.to_thread(render_chat, tokenizer, req.inputs)})
        check_prompt_chars(req.inputs, limits)
        special = False
    ids = await encode_off_loop(tokenizer, req.inputs, add_special_tokens=special)
    return _with_prompt(req, checked, ids, limits, header_token)


async def encode_off_loop(tokenizer: TextEncoder, text: str, *, add_special_tokens: bool) -> list[int]:
    """Tokenize on the loop's default executor (the server's helper pool), not the request thread.

    Through `encode_batch` where the tokenizer has it: `tokenizers`' single `encode` keeps the GIL
    for its whole run (a 1 MB prompt froze the event loop for 1.2 s even from a worker thread),
    while its batch call releases it. Both give the same ids.
    """
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return (await asyncio.to_thread(batch, [text], add_special_tokens=add_special_tokens))[0]


def _check_parameters(
    req: GenerateRequest, cfg: ServerConfig, limits: Limits, stream: bool
) -> _CheckedParameters:
    """Every check that needs no tokens, in LoRAX's order."""
    p = req.parameters
    merge = merge_spec(p)
    best_of = 1 if p.best_of is None else p.best_of
    if best_of > 1 and not implies_sampling(p):
        raise validation_error("you must use sampling when `best_of` is > 1")
    params = _sampling_params(p)
    if len(p.stop) > cfg.max_stop_sequences:
        raise validation_error(
            f"`stop` supports up to {cfg.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
        )
    if p.seed is not None and best_of > 1:
        raise validation_error("`seed` must not be set when `best_of` > 1")
    if not req.inputs:
        raise validation_error("`inputs` cannot be empty")
    if p.truncate is not None and (p.truncate <= 0 or p.truncate > limits.max_input_length):
        raise validation_error(
            f"`truncate` must be strictly positive and less than {limits.max_input_length}. Given: {p.truncate}"
        )
    check_best_of(best_of, cfg, stream)
    if stream and p.decoder_input_details:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
    return _CheckedParameters(merge, best_of, params)


def _with_prompt(
    req: GenerateRequest,
    checked: _CheckedParameters,
    ids: list[int],
    limits: Limits,
    header_token: str | None,
) -> ValidatedRequest:
    """The token-count checks and the engine inputs, once the prompt is tokenized."""
    p = req.parameters
    merge, best_of, params = checked.merge, checked.best_of, checked.params
    # LoRAX checks the input length on the untruncated prompt: `truncate` cannot make a prompt
    # over `--max-input-length` acceptable, it only shortens one that already fits.
    if len(ids) > limits.max_input_length:
        raise validation_error(
            f"`inputs` must have less than {limits.max_input_length} tokens. Given: {len(ids)}"
        )
    if p.truncate is not None and p.truncate < len(ids):
        ids = ids[-p.truncate :]  # keep the end of the prompt, as LoRAX's left truncation does
    n = len(ids)
    if p.max_new_tokens is not None and n + p.max_new_tokens > limits.max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {p.max_new_tokens} `max_new_tokens`"
        )
    params.max_new_tokens = (
        p.max_new_tokens if p.max_new_tokens is not None else max(1, limits.max_total_tokens - n)
    )

    adapter_id = p.adapter_id or None
    token = p.api_token or header_token
    if token is not None and (not token.isprintable() or any(c.isspace() for c in token)):
        # No source accepts such a token and HTTP clients refuse to send it; never echo it back.
        raise ApiError("`api_token` is malformed: it contains whitespace or control characters", 401)
    return ValidatedRequest(
        inputs=req.inputs,
        prompt_ids=ids,
        params=params,
        best_of=best_of,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=bool(p.return_full_text),
        adapter_id=adapter_id,
        adapter_source=p.adapter_source,
        api_token=token,
        merge=merge,
    )
