"""LoRAX wire format (request and response bodies), field for field.

Fields mirror LoRAX's `GenerateParameters`; unknown fields are ignored like
serde does, so newer clients keep working. Range checks that LoRAX performs
itself live in `validation.py` to reproduce its messages exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraserve.server.errors import ApiError, validation_error


def _path(parts: tuple[str | int, ...]) -> str:
    """`parameters.stop.0`; keys are escaped, so a message naming one can always be sent."""
    text = ".".join(str(p) for p in parts) or "body"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_body(value: Any) -> None:
    """Every request body, before its fields are parsed: valid Unicode, finite numbers.

    * 400 for a lone UTF-16 surrogate (JSON `"\\ud800"`) in any string or key: Python's JSON parser
      accepts them, but no tokenizer, log line or response can encode them; left in, they surfaced
      later as a 500 with a plain-text body.
    * 422 for NaN or +-Infinity anywhere (Python's parser accepts `NaN`, `Infinity` and overflowing
      literals like `1e999`): no parameter has a meaning for them, and a NaN temperature or
      penalty turns every logit of the request into NaN.

    Iterative, so nesting as deep as the JSON parser allows cannot exhaust the stack here.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise validation_error(f"`{_path(path)}` must be a finite number. Given: {item}")
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str):
                    _check_text(k, path)
                stack.append((v, (*path, k)))
        elif isinstance(item, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(item))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            f"`{_path(path)}` is not valid Unicode: it contains a lone surrogate "
            f"({text[e.start]!r} at character {e.start})",
            400,
            "bad_request",
        ) from None


class CheckedBody(BaseModel):
    """A request body: `check_body` runs on the raw JSON before any field is parsed.

    Its `ApiError` is not a `ValueError`, so pydantic lets it through and the route answers with
    its status (400 or 422) rather than a field-type message.
    """

    @model_validator(mode="before")
    @classmethod
    def _check_raw(cls, data: Any) -> Any:
        check_body(data)
        return data


class MergedAdapters(BaseModel):
    """LoRAX's `merged_adapters`; `null` strategy/sign method mean linear/total."""

    ids: list[str]
    weights: list[float] = Field(default_factory=list)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    # `lorax-client` always sends it; a hand-written request that leaves it out means no pruning.
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] | None = None


class ResponseFormat(BaseModel):
    """LoRAX's structured output: `json_object` (any JSON object, or the `schema` when given),
    `json_schema` (the `schema`), `text` (free text)."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_object", "json_schema", "text"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


def _range(**bounds: float) -> dict[str, Any]:
    """Document a range in the OpenAPI schema only: `validation.py` enforces it with LoRAX's own messages."""
    return dict(bounds)


class GenerateParameters(BaseModel):
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = Field(default=None, json_schema_extra=_range(minimum=1))
    temperature: float | None = Field(default=None, json_schema_extra=_range(minimum=0))
    repetition_penalty: float | None = Field(default=None, json_schema_extra=_range(exclusiveMinimum=0))
    frequency_penalty: float | None = Field(default=None, json_schema_extra=_range(minimum=-2, maximum=2))
    presence_penalty: float | None = Field(default=None, json_schema_extra=_range(minimum=-2, maximum=2))
    top_k: int | None = Field(default=None, json_schema_extra=_range(minimum=1))
    top_p: float | None = Field(default=None, json_schema_extra=_range(exclusiveMinimum=0, maximum=1))
    typical_p: float | None = Field(
        default=None, json_schema_extra=_range(exclusiveMinimum=0, exclusiveMaximum=1)
    )
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, json_schema_extra=_range(minimum=1))
    ignore_eos_token: bool = False
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(default=None, json_schema_extra=_range(minimum=1))
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, json_schema_extra=_range(minimum=1))
    apply_chat_template: bool = False
    seed: int | None = Field(default=None, json_schema_extra=_range(minimum=0))
    response_format: ResponseFormat | None = None


class GenerateRequest(CheckedBody):
    inputs: str = Field(json_schema_extra={"minLength": 1})
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """Body of `POST /`, the route `lorax-client` calls; `stream` picks the answer's shape."""

    stream: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None
    # Required by LoRAX 0.7's client: true for a token accepted from a speculative draft.
    skipped: bool = False


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]


class Details(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    # Required by LoRAX 0.7's client: how many of `tokens` came from accepted drafts (`skipped`).
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None
    # loraserve's addition (omitted when the request was not speculated); LoRAX clients ignore it
    speculative_tokens_per_step: float | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    speculative_tokens_per_step: float | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(CheckedBody):
    """LoRAX's `/tokenize` body."""

    inputs: str
    add_special_tokens: bool | None = None  # null or absent: true, as LoRAX reads it


class SimpleToken(BaseModel):
    """One token of a `/tokenize` answer: `start`/`stop` are character offsets into `inputs`."""

    id: int
    text: str  # the vocabulary entry (e.g. "▁hello"), as LoRAX's `id_to_token`
    start: int
    stop: int


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    """Every field of LoRAX's `Info` (router/src/lib.rs) with its type, plus the adapter limits
    loraserve adds; LoRAX's own tools read it, so no field may be missing or change type."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "lorax"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    waiting_served_ratio: float
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_waiting_tokens: int
    validation_workers: int = 1
    # LoRAX's flag: admit new prompts while others decode. loraserve's scheduler always does.
    eager_prefill: bool = True
    max_active_adapters: int
    max_lora_rank: int | None = None
    default_adapter_source: str
    adapter_id: str | None = None
    preloaded_adapter_ids: list[str]
    speculative_tokens: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    request_logger_url: str | None = None
