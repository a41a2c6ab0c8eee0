"""Structured output (engine/grammar.py): JSON-schema constrained decoding on the tiny random model,
alone and in mixed batches with free rows and LoRA adapters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import allowed_tokens, apply_bitmask, fill_bitmask, grammar_text
from loraserve.engine.params import ResponseFormat, SamplingParams

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS: list[dict] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}, "y": {"type": "null"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
        "required": ["color", "tags", "point"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        },
        "required": ["id", "code"],
        "additionalProperties": False,
    },
]
#: More shapes for the validation test (the three above are also mixed into batches). Objects are
#: closed (`additionalProperties: false`): in an open one the random model adds keys until the budget.
MORE_SCHEMAS: list[dict] = [
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -3, "maximum": 3},
        "minItems": 1,
        "maxItems": 4,
    },
    {
        "type": "object",
        "properties": {"opt": {"type": "string", "maxLength": 3}, "req": {"type": "boolean"}},
        "required": ["req"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": [1, 2, 3]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["x"],
    },
    {"enum": ["yes", "no", {"maybe": True}]},
    {
        "type": "object",
        "properties": {"v": {"oneOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-c]{1,3}$"}]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "k": {"type": "string", "maxLength": 2},
                        "n": {"type": "integer", "maximum": 5},
                    },
                    "required": ["k", "n"],
                    "additionalProperties": False,
                },
                "maxItems": 2,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
]


def engine(path: Path) -> Engine:
    cfg = EngineConfig(kv_cache_memory_bytes=32 << 20, adapter_memory_bytes=64 << 20, max_lora_rank=16)
    return Engine.from_pretrained(path, cfg)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 280, (5 + i,), generator=g).tolist() for i in range(n)]


def constrained(schema: dict | None, kind: str = "json_schema", **kw) -> SamplingParams:
    fmt = ResponseFormat(kind, schema)  # type: ignore[arg-type]
    kw.setdefault("max_new_tokens", 120)
    return SamplingParams(response_format=fmt, **kw)


def check_json(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema if schema is not None else {"type": "object"})


@pytest.fixture(scope="module")
def eng(llama_dir: Path) -> Engine:
    return engine(llama_dir)


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
@pytest.mark.parametrize("schema", SCHEMAS, ids=["flat", "nested", "anyof"])
def test_greedy_and_sampled_outputs_validate(eng: Engine, schema: dict, kind: str) -> None:
    ps = prompts(2)
    params = [constrained(schema, kind), constrained(schema, kind, do_sample=True, temperature=0.9, seed=7)]
    outs = eng.generate(ps, params)
    for out in outs:
        assert out.finish_reason == "eos_token", out.generated_text
        check_json(out.generated_text, schema)


@pytest.mark.parametrize("schema", MORE_SCHEMAS, ids=[f"more{i}" for i in range(len(MORE_SCHEMAS))])
def test_more_schema_shapes_validate(eng: Engine, schema: dict) -> None:
    ps = prompts(2, seed=11)
    params = [constrained(schema), constrained(schema, do_sample=True, temperature=1.0, seed=3)]
    for out in eng.generate(ps, params):
        assert out.finish_reason == "eos_token", out.generated_text
        check_json(out.generated_text, schema)


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos_token(eng: Engine) -> None:
    out = eng.generate(prompts(1), constrained(SCHEMAS[0], ignore_eos_token=True))[0]
    assert out.finish_reason == "eos_token" and out.tokens[-1].id in eng.eos_ids
    check_json(out.generated_text, SCHEMAS[0])


def test_properties_come_in_schema_order(eng: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    out = eng.generate(prompts(1), constrained(schema))[0]
    assert list(json.loads(out.generated_text)) == ["zeta", "alpha"]


def test_json_object_without_schema_is_an_object(eng: Engine) -> None:
    """Any JSON object: the random model may not close it within the budget, but it opens one
    and every prefix it writes is a valid object prefix (it never finishes otherwise)."""
    out = eng.generate(prompts(1), constrained(None, "json_object", max_new_tokens=40))[0]
    assert out.generated_text.startswith("{")
    if out.finish_reason == "eos_token":
        check_json(out.generated_text, None)


def test_mixed_batch_with_adapters_and_free_rows(eng: Engine, llama_adapters: list[Path]) -> None:
    """Constrained rows (different schemas, base and adapters) beside free rows in one batch:
    every constrained output validates, every free row gives exactly its tokens alone."""
    ads = [parse_peft_adapter(p) for p in llama_adapters[:3]]
    ps = prompts(8, seed=3)
    free = SamplingParams(max_new_tokens=16, ignore_eos_token=True)
    params, adapters, schemas = [], [], []
    for i in range(8):
        adapters.append(ads[i % 3] if i % 4 else None)
        if i % 2:
            params.append(free)
            schemas.append(None)
        else:
            schemas.append(SCHEMAS[(i // 2) % len(SCHEMAS)])
            params.append(constrained(schemas[-1]))
    outs = eng.generate(ps, params, adapters)
    for i, out in enumerate(outs):
        if i % 2:
            alone = eng.generate([ps[i]], free, [adapters[i]])[0]
            assert [t.id for t in out.tokens] == [t.id for t in alone.tokens]
        else:
            check_json(out.generated_text, schemas[i])


def test_length_before_the_grammar_ends_is_a_partial_answer(eng: Engine) -> None:
    out = eng.generate(prompts(1), constrained(SCHEMAS[0], max_new_tokens=3))[0]
    assert out.finish_reason == "length"
    assert out.generated_text.startswith("{")


def test_constrained_requests_are_speculated(llama_dir: Path) -> None:
    from tests.engine.test_speculative import engine as spec_engine
    from tests.engine.test_speculative import heads

    e = spec_engine(llama_dir, heads(64, 2, 0.0, seed=0))
    assert e.speculators.for_request(None, constrained(SCHEMAS[0])) is e.default_speculator


@pytest.mark.parametrize(
    "schema", [{"type": "wat"}, {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}]
)
def test_invalid_schema_is_a_request_error(eng: Engine, schema: dict) -> None:
    with pytest.raises(RequestError, match="response_format"):
        eng.add_request([1, 5, 6], constrained(schema))
    with pytest.raises(RequestError, match="response_format"):
        grammar_text(ResponseFormat("json_schema", schema))


def test_json_schema_without_schema_is_refused() -> None:
    with pytest.raises(RequestError, match="response_format"):
        SamplingParams(response_format=ResponseFormat("json_schema")).validate()


def test_padded_vocab_ids_are_masked(eng: Engine) -> None:
    """Ids past the tokenizer's vocabulary never pass the mask of a constrained row."""
    m = eng.grammars.matcher(ResponseFormat("json_object"))
    v = eng.runner.vocab_size
    assert v > eng.tokenizer.vocab_size  # the tiny model's lm_head is padded
    allowed = ~torch.isinf(apply_bitmask(torch.zeros(1, v), fill_bitmask([m], v)))[0]
    assert allowed.any() and not allowed[eng.tokenizer.vocab_size :].any()


def test_bit_unpacking_is_the_same_on_every_path() -> None:
    """The CPU (numpy) and accelerator (shift) unpackings agree, bit order and sign bit included."""
    mask = torch.randint(-(2**31), 2**31 - 1, (5, 13), dtype=torch.int32)
    mask[0, 0] = -1
    cpu = allowed_tokens(mask, 400, torch.device("cpu"))
    ref = torch.tensor([[(int(mask[r, t // 32]) >> (t % 32)) & 1 for t in range(400)] for r in range(5)])
    assert torch.equal(cpu, ref.bool())
    meta_like = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert torch.equal(meta_like.reshape(5, -1)[:, :400].bool(), cpu)
    if torch.cuda.is_available():
        assert torch.equal(allowed_tokens(mask, 400, torch.device("cuda")).cpu(), cpu)


def test_mask_cost_per_step(eng: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a bound, a measurement: fill + apply for 32 constrained rows on this tiny vocabulary."""
    ms = [eng.grammars.matcher(ResponseFormat("json_schema", SCHEMAS[i % 3])) for i in range(32)]
    v = eng.runner.vocab_size
    logits = torch.randn(32, v)
    t0 = time.perf_counter()
    for _ in range(20):
        apply_bitmask(logits, fill_bitmask(ms, v))
    dt = (time.perf_counter() - t0) / 20
    with capsys.disabled():
        print(f"\ngrammar mask, 32 rows x {v} vocab: {dt * 1e3:.3f} ms/step")


def test_a_tokenizer_llguidance_cannot_read_is_a_request_error(eng: Engine) -> None:
    from loraserve.engine.grammar import GrammarCompiler

    class Broken:
        class backend:  # noqa: N801
            @staticmethod
            def to_str() -> str:
                return "{not a tokenizer"

    g = GrammarCompiler(Broken(), 100, [0])  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="response_format: structured output is unavailable"):
        g.matcher(ResponseFormat("json_object"))
