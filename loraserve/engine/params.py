"""Per-request generation parameters and the results the engine hands back.

These are plain dataclasses so the server layer can build them from any wire
format (LoRAX REST, OpenAI) and the engine never sees HTTP concepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from loraserve.engine.errors import RequestError

#: Sampling at a temperature below this divides float32 logits into overflow (1e-300 is 0.0 in
#: float32, 1e-40 turns a logit of 10 into inf) and NaN probabilities; the distribution is the
#: argmax to float precision long before. The server decodes such requests greedily (vLLM's bound).
MIN_SAMPLING_TEMPERATURE = 1e-5
#: The same overflow for `repetition_penalty` (a repeated token's logit is divided by it); the
#: server raises smaller penalties to this floor, where repeated tokens already dominate.
MIN_REPETITION_PENALTY = 1e-5


@dataclass(frozen=True)
class ResponseFormat:
    """A structured-output constraint (engine/grammar.py): `json_object` = any JSON object, or
    the one `schema` describes when given; `json_schema` = the JSON `schema` (required)."""

    type: Literal["json_object", "json_schema"]
    schema: dict | None = None


FinishReason = Literal["length", "eos_token", "stop_sequence", "aborted", "error"]


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    `do_sample=False` means greedy regardless of temperature/top_k/top_p, which
    is LoRAX's rule; the server turns `temperature>0` etc. into `do_sample=True`
    the same way LoRAX does before building this object.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled
    typical_p: float = 1.0  # 1.0 = disabled
    repetition_penalty: float = 1.0  # 1.0 = disabled
    frequency_penalty: float = 0.0  # OpenAI's: minus this x count of each generated token
    presence_penalty: float = 0.0  # OpenAI's: minus this once for every token generated before
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos_token: bool = False
    logprobs: bool = True  # logprob of each chosen token
    top_n_alternatives: int = 0  # return_k_alternatives
    prefill_logprobs: bool = False  # decoder_input_details
    watermark: bool = False  # bias a green list of tokens (LoRAX/TGI watermarking)
    response_format: ResponseFormat | None = None  # None = free text

    def validate(self) -> None:
        """Raise ValueError naming the offending field; the server maps it to 422."""
        if self.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be >= 1")
        for name in (
            "temperature",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if not math.isfinite(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise RequestError("temperature must be >= 0")
        if self.do_sample and 0 < self.temperature < MIN_SAMPLING_TEMPERATURE:
            raise RequestError(f"temperature must be 0 or >= {MIN_SAMPLING_TEMPERATURE} when sampling")
        if self.top_k < 0:
            raise RequestError("top_k must be >= 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2]")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]")
        if not 0 < self.typical_p <= 1:
            raise RequestError("typical_p must be in (0, 1]")
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise RequestError(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}")
        if self.seed is not None and self.seed < 0:
            raise RequestError("seed must be >= 0")
        if self.top_n_alternatives < 0:
            raise RequestError("return_k_alternatives must be >= 0")
        rf = self.response_format
        if rf is not None:
            if rf.type not in ("json_object", "json_schema"):
                raise RequestError("response_format.type must be json_object or json_schema")
            if rf.type == "json_schema" and rf.schema is None:
                raise RequestError("response_format: json_schema needs a schema")
            if rf.schema is not None and not isinstance(rf.schema, dict):
                raise RequestError("response_format.schema must be a JSON object")


@dataclass
class TokenInfo:
    """One token as reported to clients (LoRAX `Token`)."""

    id: int
    text: str
    logprob: float | None
    special: bool = False
    alternatives: list[tuple[int, str, float]] | None = None
    skipped: bool = False  # accepted from a speculative draft (LoRAX's `Token.skipped`)


@dataclass
class RequestOutput:
    """An incremental update for one request, produced by one engine step.

    `tokens` holds the tokens accepted in this step (several when speculative
    decoding accepts a draft), `finished` is set on the last update.
    """

    request_id: str
    tokens: list[TokenInfo]
    finished: bool = False
    finish_reason: FinishReason | None = None
    generated_text: str | None = None  # full text, on the last update only
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int | None = None
    prefill: list[TokenInfo] | None = None  # on the first update, when asked
    error: str | None = None
    spec_steps: int = 0  # steps that verified Medusa drafts for this request so far
    spec_tokens: int = 0  # tokens those steps emitted (spec_tokens / spec_steps = accepted per step)
