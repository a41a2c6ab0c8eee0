"""LoRAX's validation rules, checked without a server (a whitespace tokenizer is enough)."""

from __future__ import annotations

import pytest

from loraserve.engine.memory_plan import Limits
from loraserve.server.config import ServerConfig
from loraserve.server.errors import ApiError
from loraserve.server.openai_text import StopAwareText, cut_at_stop
from loraserve.server.schemas import GenerateParameters, GenerateRequest
from loraserve.server.validation import bearer_token, chat_messages, validate_generate


class WordTokenizer:
    """One id per word, plus a BOS id 1, like a real tokenizer with add_special_tokens."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [100 + len(w) for w in text.split()]
        return ([1] if add_special_tokens else []) + ids


CFG = ServerConfig(max_best_of=2, max_stop_sequences=2)
LIMITS = Limits(
    max_input_length=10,
    max_total_tokens=20,
    max_batch_prefill_tokens=10,
    max_batch_total_tokens=64,
    max_active_adapters=1,
    max_lora_rank=8,
    max_num_seqs=4,
    block_size=16,
)


def run(inputs: str = "a bb ccc", stream: bool = False, header: str | None = None, **params):
    req = GenerateRequest(inputs=inputs, parameters=GenerateParameters(**params))
    return validate_generate(req, CFG, LIMITS, WordTokenizer(), stream=stream, header_token=header)


def test_defaults_follow_lorax() -> None:
    v = run()
    assert v.prompt_ids == [1, 101, 102, 103]
    assert v.params.max_new_tokens == 20 - 4  # max_total_tokens - input length
    assert not v.params.do_sample and v.best_of == 1 and not v.details and not v.return_full_text


@pytest.mark.parametrize("knob", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}, {"typical_p": 0.5}])
def test_sampling_knobs_imply_do_sample(knob: dict) -> None:
    assert run(**knob).params.do_sample


def test_temperature_one_alone_stays_greedy() -> None:
    assert not run(temperature=1.0).params.do_sample


def test_truncate_keeps_the_last_tokens() -> None:
    assert run(inputs="a bb ccc dddd", truncate=2).prompt_ids == [103, 104]


def test_authorization_header_token_and_parameter_precedence() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Basic abc") is None
    assert run(header="from-header").api_token == "from-header"
    assert run(header="from-header", api_token="from-param").api_token == "from-param"


@pytest.mark.parametrize(
    ("params", "stream", "message"),
    [
        ({"temperature": -0.1}, False, "`temperature` must be non-negative"),
        ({"repetition_penalty": 0.0}, False, "`repetition_penalty`"),
        ({"top_p": 1.01}, False, "`top_p` must be > 0.0 and < 1.0"),
        ({"frequency_penalty": 2.01}, False, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.5}, False, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"typical_p": 0.0}, False, "`typical_p`"),
        ({"top_k": 0}, False, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, False, "`max_new_tokens` must be strictly positive"),
        ({"return_k_alternatives": 0}, False, "`return_k_alternatives`"),
        ({"stop": ["a", "b", "c"]}, False, "`stop` supports up to 2 stop sequences. Given: 3"),
        ({"best_of": 2}, False, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 3, "do_sample": True}, False, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, False, "`seed` must not be set when `best_of` > 1"),
        ({"best_of": 2, "do_sample": True}, True, "`best_of` != 1 is not supported when streaming tokens"),
        ({"decoder_input_details": True}, True, "`decoder_input_details` == true is not supported"),
        ({"truncate": 0}, False, "`truncate` must be strictly positive and less than 10"),
        ({"truncate": 11}, False, "`truncate` must be strictly positive and less than 10"),
        ({"max_new_tokens": 17}, False, "`inputs` tokens + `max_new_tokens` must be <= 20"),
        ({"response_format": {"type": "json_object", "schema": {"type": "wat"}}}, False, "`response_format`"),
        ({"response_format": {"type": "json_schema"}}, False, "`response_format`"),
        (
            {
                "merged_adapters": {
                    "ids": ["a", "b"],
                    "weights": [1, 1],
                    "merge_strategy": "ties",
                    "density": 1.5,
                }
            },
            False,
            "`merged_adapters`: `density` must be >= 0.0 and <= 1.0",
        ),
        ({"merged_adapters": {"ids": ["a"], "weights": []}}, False, "must match number of adapter weights"),
        ({"merged_adapters": {"ids": ["a"], "weights": [1]}, "adapter_id": "x"}, False, "at most one of"),
    ],
)
def test_invalid_parameters_are_422_with_lorax_messages(params: dict, stream: bool, message: str) -> None:
    with pytest.raises(ApiError) as e:
        run(stream=stream, **params)
    assert e.value.status_code == 422 and e.value.error_type == "validation"
    assert message in e.value.message


def test_empty_and_too_long_inputs() -> None:
    with pytest.raises(ApiError, match="`inputs` cannot be empty"):
        run(inputs="")
    with pytest.raises(ApiError, match="`inputs` must have less than 10 tokens. Given: 12"):
        run(inputs=" ".join(["w"] * 11))


def test_input_length_is_checked_before_truncate() -> None:
    """LoRAX's router: `truncate` shortens a prompt that fits, it never makes a long one fit."""
    with pytest.raises(ApiError, match="`inputs` must have less than 10 tokens. Given: 12"):
        run(inputs=" ".join(["w"] * 11), truncate=5)
    assert run(inputs=" ".join(["w"] * 9), truncate=5).prompt_ids == [101] * 5


def test_temperature_zero_is_greedy_and_top_p_one_is_accepted() -> None:
    assert not run(temperature=0.0).params.do_sample
    assert not run(temperature=0.0, do_sample=True).params.do_sample
    assert run(top_p=1.0).params.top_p == 1.0


@pytest.mark.parametrize("value", [-2.0, -0.5, 0.0, 1.25, 2.0])
def test_openai_penalties_reach_sampling_params(value: float) -> None:
    params = run(frequency_penalty=value, presence_penalty=-value).params
    assert params.frequency_penalty == value and params.presence_penalty == -value
    assert run().params.frequency_penalty == 0.0 and run().params.presence_penalty == 0.0


def test_stop_sequences_never_leak_into_openai_text() -> None:
    assert cut_at_stop("hello END tail", ["END"]) == "hello "
    text = StopAwareText(["END"])
    pieces = [text.push(p) for p in ["hel", "lo E", "N", "D more"]]
    assert "".join(pieces) + text.finish(True) == "hello "
    assert pieces[1] == "lo "  # "E" waits: it may start the stop sequence
    plain = StopAwareText(["END"])
    assert plain.push("the E") == "the " and plain.finish(False) == "E"


class TemplateTokenizer(WordTokenizer):
    """A word tokenizer with a chat template: `role: content` lines, then `assistant:`."""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if any(m["role"] == "bad" for m in messages):
            raise ValueError("roles must be user or assistant")
        text = " ".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)
        return text + (" assistant:" if add_generation_prompt else "")


def chat(inputs: str, **params):
    req = GenerateRequest(inputs=inputs, parameters=GenerateParameters(apply_chat_template=True, **params))
    return validate_generate(req, CFG, LIMITS, TemplateTokenizer())


def test_apply_chat_template_renders_a_message_list_or_a_plain_user_string() -> None:
    v = chat('[{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]')
    assert v.inputs == "system: be user: hi assistant:"
    assert v.prompt_ids == WordTokenizer().encode(v.inputs, add_special_tokens=False)  # no second BOS
    assert chat("hello there").inputs == "user: hello there assistant:"
    assert chat("42").inputs == "user: 42 assistant:"  # JSON, but not a list of messages
    deep = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not ValueError
    assert chat_messages(deep) == [{"role": "user", "content": deep}]
    assert run(inputs="hello there").inputs == "hello there"  # without the flag nothing is rendered


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("[]", "`inputs` cannot be empty"),
        ('[{"content": "no role"}]', "message 0 must be an object with a string `role`"),
        ('["just text"]', "message 0 must be an object"),
        ('[{"role": "user", "content": [1]}]', "message 0 `content` must be a string"),
        ('[{"role": "bad", "content": "x"}]', "cannot build a chat prompt: roles must be user or assistant"),
    ],
)
def test_apply_chat_template_refusals_are_422(inputs: str, message: str) -> None:
    with pytest.raises(ApiError) as e:
        chat(inputs)
    assert e.value.status_code == 422 and message in e.value.message


def test_apply_chat_template_without_a_template_is_422() -> None:
    req = GenerateRequest(inputs="hi", parameters=GenerateParameters(apply_chat_template=True))
    with pytest.raises(ApiError, match="no chat template"):
        validate_generate(req, CFG, LIMITS, WordTokenizer())
