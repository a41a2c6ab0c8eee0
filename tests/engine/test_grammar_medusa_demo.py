"""Structured output with the shipped demo Medusa heads (demo/medusa) drafting: every output
validates, greedy constrained output is the same with speculation as without, in one batch of
all the schemas with the demo adapters and free rows mixed in.

The oracle-draft tests (test_grammar_speculative.py) prove accepted drafts advance the grammar;
these prove it with the real heads, whose drafts the grammar mostly cuts (they were trained on
the demo's chat tasks, not on JSON) — the counters show speculation was on all the same.
"""

from __future__ import annotations

import pytest

from loraserve.adapters.medusa_format import parse_adapter_dir
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine import engine as engine_module
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.demo.cases import DEMO_DIR, MODEL_DIR, TASKS, adapter_dir, demo_cases
from tests.engine.test_grammar import MORE_SCHEMAS, SCHEMAS, check_json, constrained

MEDUSA_DIR = DEMO_DIR / "medusa"


def finite(schema: object) -> object:
    """The schema with every `number` a multiple of 0.5 and every object closed: the demo model,
    unlike the random test model, loops on digits and on new keys, and an unbounded fraction or
    an open object then never ends."""
    if isinstance(schema, list):
        return [finite(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: finite(v) for k, v in schema.items()}
    if schema.get("type") == "number":
        out.setdefault("multipleOf", 0.5)
    if schema.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out


ALL = [finite(s) for s in SCHEMAS + MORE_SCHEMAS]
pytestmark = pytest.mark.skipif(not (MEDUSA_DIR / "config.json").is_file(), reason="demo/medusa not built")


def demo_engine(medusa: bool) -> Engine:
    e = Engine.from_pretrained(MODEL_DIR, EngineConfig(kv_cache_memory_bytes=64 << 20, max_lora_rank=16))
    if medusa:
        e.set_default_speculator(parse_adapter_dir(MEDUSA_DIR).medusa)
    return e


def batch(sampled: bool) -> tuple[list[str], list[SamplingParams], list]:
    """Every schema once, plus a free row per task, on the demo's own chat prompts; rows take
    the base model or one of the demo adapters in turn."""
    prompts = [p for task in TASKS for p, _ in demo_cases(task)[:6]]
    adapters = [None, *(parse_peft_adapter(adapter_dir(t)) for t in TASKS)]
    kw = {"do_sample": True, "temperature": 0.8} if sampled else {}
    params = [constrained(s, max_new_tokens=100, seed=i, **kw) for i, s in enumerate(ALL)]
    params += [SamplingParams(max_new_tokens=24, **kw) for _ in TASKS]
    n = len(params)
    return prompts[:n], params, [adapters[i % len(adapters)] for i in range(n)]


def test_greedy_constrained_with_the_demo_heads_is_identical_and_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert len(ALL) >= 10
    prompts, params, adapters = batch(sampled=False)
    plain = demo_engine(medusa=False).generate(prompts, params, adapters)
    drafted = kept = 0
    cut = engine_module.cut_drafts

    def counting(matcher, drafts):  # type: ignore[no-untyped-def]
        nonlocal drafted, kept
        out = cut(matcher, drafts)
        drafted, kept = drafted + len(drafts), kept + len(out)
        return out

    monkeypatch.setattr(engine_module, "cut_drafts", counting)
    e = demo_engine(medusa=True)
    spec = e.generate(prompts, params, adapters)
    assert [[t.id for t in o.tokens] for o in spec] == [[t.id for t in o.tokens] for o in plain]
    for schema, out in zip(ALL, spec):
        check_json(out.generated_text, schema)
        assert out.finish_reason == "eos_token"
    # speculation was on for the constrained rows: the heads drafted, the grammar cut what it
    # rejects, and what it kept went through verification
    assert e.spec_steps > 0 and drafted > 0 and kept <= drafted, (drafted, kept)
    print(f"demo heads: {drafted} drafts for constrained rows, {kept} grammar-valid, {e.spec_tokens} tokens")


def test_sampled_constrained_with_the_demo_heads_validates() -> None:
    """Seeded sampling, constrained rows only on the base model (the adapters' cost is in the
    greedy test's batch already)."""
    prompts, params, _ = batch(sampled=True)
    e = demo_engine(medusa=True)
    outs = e.generate(prompts[: len(ALL)], params[: len(ALL)])
    for schema, out in zip(ALL, outs):
        check_json(out.generated_text, schema)
    assert e.spec_steps > 0
