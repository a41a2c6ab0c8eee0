"""A compact copy of LoRAX's Python client 0.7 response models (`clients/python/lorax/types.py`).

The 0.7 client parses every response with these: a missing required field fails parsing, an
unknown field is ignored. So here: `extra="ignore"`, and every field the client requires is
required (no defaults), so a response that leaves one out fails validation in our tests the
way it would fail in a LoRAX user's program. Field lists: ../shared/reference/lorax-api.md,
"LoRAX at HEAD". `Info` follows LoRAX's router `Info` (router/src/lib.rs) with its types.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr


class _Model(BaseModel):
    """Unknown fields allowed, missing fields fail; no silent coercion of types."""

    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class AlternativeToken(_Model):
    id: StrictInt
    text: StrictStr
    logprob: StrictFloat | None


class InputToken(_Model):
    id: StrictInt
    text: StrictStr
    logprob: StrictFloat | None


class Token(_Model):
    id: StrictInt
    text: StrictStr
    logprob: StrictFloat | None
    special: StrictBool
    alternative_tokens: list[AlternativeToken] | None = None
    skipped: StrictBool


class BestOfSequence(_Model):
    generated_text: StrictStr
    finish_reason: FinishReason
    generated_tokens: StrictInt
    seed: StrictInt | None
    prefill: list[InputToken]
    tokens: list[Token]


class Details(_Model):
    finish_reason: FinishReason
    prompt_tokens: StrictInt
    generated_tokens: StrictInt
    skipped_tokens: StrictInt
    seed: StrictInt | None
    prefill: list[InputToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None


class Response(_Model):
    generated_text: StrictStr
    details: Details | None = None


class StreamDetails(_Model):
    finish_reason: FinishReason
    prompt_tokens: StrictInt
    generated_tokens: StrictInt
    seed: StrictInt | None


class StreamResponse(_Model):
    token: Token
    generated_text: StrictStr | None
    details: StreamDetails | None


class Info(_Model):
    """LoRAX router's `Info`: integers are `usize`/`u32`, `waiting_served_ratio` an `f32`."""

    model_id: StrictStr
    model_sha: StrictStr | None
    model_dtype: StrictStr
    model_device_type: StrictStr
    model_pipeline_tag: StrictStr | None
    max_concurrent_requests: StrictInt
    max_best_of: StrictInt
    max_stop_sequences: StrictInt
    max_input_length: StrictInt
    max_total_tokens: StrictInt
    waiting_served_ratio: StrictFloat
    max_batch_total_tokens: StrictInt
    max_waiting_tokens: StrictInt
    validation_workers: StrictInt
    eager_prefill: StrictBool
    version: StrictStr
    sha: StrictStr | None
    docker_label: StrictStr | None
    request_logger_url: StrictStr | None


class SimpleToken(_Model):
    """One entry of LoRAX's `/tokenize` answer."""

    id: StrictInt
    text: StrictStr
    start: StrictInt
    stop: StrictInt
