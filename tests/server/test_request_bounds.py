"""Issue 17's bounds without a server: the sequence-counting limiter, the character bound, degenerate
numbers and text, and the `--max-prompts-per-request` flag. The HTTP behaviour is in
tests/reliability/test_hardening.py."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from loraserve.engine.errors import RequestError
from loraserve.engine.params import MIN_REPETITION_PENALTY, SamplingParams
from loraserve.server.config import ServerConfig
from loraserve.server.errors import ApiError
from loraserve.server.flags import EnvArgumentParser, add_serve_flags
from loraserve.server.generation import LOGPROB_FLOOR, ConcurrencyLimiter, wire_logprob
from loraserve.server.openai_schemas import ChatCompletionRequest, CompletionRequest
from loraserve.server.schemas import GenerateParameters, GenerateRequest
from loraserve.server.validation import (
    MAX_CHARS_PER_TOKEN,
    check_prompt_chars,
    encode_off_loop,
    validate_generate,
    validate_generate_async,
)
from tests.server.test_validation import LIMITS  # the same small limits

CFG = ServerConfig(max_best_of=2)


class CountingTokenizer:
    """One id per character; counts calls so a test can tell whether tokenizing happened."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        return [ord(c) % 50 for c in text]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]


def request(inputs: str = "abc", **params: object) -> GenerateRequest:
    return GenerateRequest(inputs=inputs, parameters=GenerateParameters(**params))


def test_limiter_counts_sequences() -> None:
    lim = ConcurrencyLimiter(4)
    lim.acquire(3)
    with pytest.raises(ApiError) as e:
        lim.acquire(2)
    assert e.value.status_code == 429
    assert lim.in_flight == 3
    lim.acquire(1)
    lim.release(3)
    lim.release(1)
    assert lim.in_flight == 0


def test_limiter_refuses_what_could_never_fit_with_422() -> None:
    lim = ConcurrencyLimiter(4)
    with pytest.raises(ApiError) as e:
        lim.acquire(5, "`n`")
    assert e.value.status_code == 422
    assert "`n`" in e.value.message and "5 sequences" in e.value.message
    assert lim.in_flight == 0


def test_character_bound_refuses_before_tokenizing() -> None:
    bound = MAX_CHARS_PER_TOKEN * LIMITS.max_input_length
    check_prompt_chars("x" * bound, LIMITS)
    with pytest.raises(ApiError) as e:
        check_prompt_chars("x" * (bound + 1), LIMITS, "prompt")
    assert e.value.status_code == 422 and "`prompt`" in e.value.message
    tok = CountingTokenizer()
    with pytest.raises(ApiError):
        asyncio.run(validate_generate_async(request("x" * (bound + 1)), CFG, LIMITS, tok))
    assert tok.calls == 0
    with pytest.raises(ApiError):
        validate_generate(request("x" * (bound + 1)), CFG, LIMITS, tok)
    assert tok.calls == 0


def test_truncate_does_not_lift_the_character_bound() -> None:
    """LoRAX checks the input length before `truncate` (issue 15): a prompt that could never fit
    is refused by its characters, untokenized, with or without `truncate`."""
    tok = CountingTokenizer()
    long = "y" * (MAX_CHARS_PER_TOKEN * LIMITS.max_input_length + 100)
    with pytest.raises(ApiError, match="`inputs` must have less than"):
        asyncio.run(validate_generate_async(request(long, truncate=4, max_new_tokens=2), CFG, LIMITS, tok))
    assert tok.calls == 0


def test_async_and_sync_validation_agree() -> None:
    tok = CountingTokenizer()
    req = request("hello", max_new_tokens=3)
    a = asyncio.run(validate_generate_async(req, CFG, LIMITS, tok))
    b = validate_generate(req, CFG, LIMITS, tok)
    assert a.prompt_ids == b.prompt_ids and a.params == b.params
    assert asyncio.run(encode_off_loop(tok, "abc", add_special_tokens=True)) == tok.encode("abc")


def test_tiny_temperature_decodes_greedily() -> None:
    v = validate_generate(
        request(temperature=1e-300, do_sample=True, top_k=5), CFG, LIMITS, CountingTokenizer()
    )
    assert not v.params.do_sample and v.params.temperature == 1.0
    v = validate_generate(request(temperature=0.5), CFG, LIMITS, CountingTokenizer())
    assert v.params.do_sample and v.params.temperature == 0.5


def test_tiny_repetition_penalty_is_floored() -> None:
    v = validate_generate(request(repetition_penalty=1e-300), CFG, LIMITS, CountingTokenizer())
    assert v.params.repetition_penalty == MIN_REPETITION_PENALTY


@pytest.mark.parametrize("field", ["temperature", "top_p", "typical_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_engine_params_refuse_non_finite(field: str, value: float) -> None:
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value}).validate()


def test_engine_params_refuse_tiny_sampling_temperature() -> None:
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(do_sample=True, temperature=1e-300).validate()
    SamplingParams(do_sample=False, temperature=1e-300).validate()  # greedy ignores it


@pytest.mark.parametrize(
    ("model", "body", "status", "says"),
    [
        (GenerateRequest, {"inputs": "\ud800"}, 400, "`inputs`"),
        (GenerateRequest, {"inputs": "a", "parameters": {"stop": ["\udc00"]}}, 400, "`parameters.stop.0`"),
        (
            GenerateRequest,
            {"inputs": "a", "parameters": {"temperature": math.nan}},
            422,
            "`parameters.temperature`",
        ),
        (
            GenerateRequest,
            {"inputs": "a", "parameters": {"merged_adapters": {"ids": ["x"], "weights": [math.inf]}}},
            422,
            "`parameters.merged_adapters.weights.0`",
        ),
        (CompletionRequest, {"prompt": ["ok", "\ud800"]}, 400, "`prompt.1`"),
        (GenerateRequest, {"inputs": "a", "parameters": {"\ud800": 1}}, 400, "`parameters`"),
        (CompletionRequest, {"prompt": "a", "top_p": -math.inf}, 422, "`top_p`"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "content"),
        (ChatCompletionRequest, {"messages": [], "response_format": {"x": math.nan}}, 422, "response_format"),
    ],
)
def test_request_bodies_are_checked_before_parsing(model: type, body: dict, status: int, says: str) -> None:
    with pytest.raises(ApiError) as e:
        model.model_validate(body)
    assert e.value.status_code == status
    assert says in e.value.message


def test_deeply_nested_bodies_are_checked() -> None:
    deep = '{"inputs": "x", "parameters": {"response_format": ' + "[" * 800 + "NaN" + "]" * 800 + "}}"
    body = json.loads(deep)  # about as deep as the parser goes
    with pytest.raises(ApiError) as e:
        GenerateRequest.model_validate(body)
    assert e.value.status_code == 422 and "finite" in e.value.message


def test_wire_logprob_is_always_json() -> None:
    assert wire_logprob(math.nan) == LOGPROB_FLOOR
    assert wire_logprob(-math.inf) == LOGPROB_FLOOR
    assert wire_logprob(math.inf) == 0.0
    assert wire_logprob(-0.25) == -0.25
    assert wire_logprob(None) is None


def test_max_prompts_per_request_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> int:
        parser = EnvArgumentParser()
        add_serve_flags(parser)
        return parser.parse_args(list(argv)).max_prompts_per_request

    monkeypatch.delenv("MAX_PROMPTS_PER_REQUEST", raising=False)
    assert parse() == 16 == ServerConfig().max_prompts_per_request
    monkeypatch.setenv("MAX_PROMPTS_PER_REQUEST", "3")
    assert parse() == 3
    assert parse("--max-prompts-per-request", "5") == 5
