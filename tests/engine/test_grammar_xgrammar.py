"""The xgrammar backend (engine/grammar_xgrammar.py) behind the engine's grammar interface: the
same schemas validate, Medusa drafts are cut and masked per position, bad schemas are refused.
Tests that run xgrammar are skipped where the optional extra is not installed (`pip install -e '.[xgrammar]'`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import cut_drafts, draft_masks, fill_bitmask, grammar_compiler
from loraserve.engine.grammar_xgrammar import XGrammarCompiler
from loraserve.engine.params import ResponseFormat
from tests.engine.test_grammar import MORE_SCHEMAS, SCHEMAS, constrained, engine, prompts
from tests.engine.test_speculative import engine as spec_engine
from tests.engine.test_speculative import heads, ids_of

needs_xgrammar = pytest.mark.skipif(
    importlib.util.find_spec("xgrammar") is None,
    reason="xgrammar not installed (pip install -e '.[xgrammar]')",
)


def test_the_backend_flag_reaches_the_engine_config() -> None:
    """Runs without xgrammar installed too: the flag only names the backend."""
    from loraserve.cli import _engine_config, build_parser

    default = build_parser().parse_args(["serve", "--model-id", "m"])
    chosen = build_parser().parse_args(["serve", "--model-id", "m", "--grammar-backend", "xgrammar"])
    assert _engine_config(default).grammar_backend == "llguidance"
    assert _engine_config(chosen).grammar_backend == "xgrammar"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model-id", "m", "--grammar-backend", "outlines"])


def test_a_missing_xgrammar_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    with pytest.raises(ValueError, match=r"xgrammar backend is not installed"):
        grammar_compiler("xgrammar", None, 10, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outlines"):
        grammar_compiler("outlines", None, 10, [])  # type: ignore[arg-type]


@needs_xgrammar
def test_the_engine_builds_the_backend_it_is_configured_with(llama_dir: Path) -> None:
    e = Engine.from_pretrained(
        llama_dir, EngineConfig(kv_cache_memory_bytes=32 << 20, grammar_backend="xgrammar")
    )
    assert isinstance(e.grammars, XGrammarCompiler)
    out = e.generate(prompts(1), constrained(SCHEMAS[2]))[0]
    lenient_json(out.generated_text, SCHEMAS[2])


def with_xgrammar(e: Engine) -> Engine:
    e.grammars = XGrammarCompiler(e.tokenizer, e.runner.vocab_size, sorted(e.eos_ids))
    return e


def lenient_json(text: str, schema: dict) -> None:
    """Parse allowing raw control characters in strings: xgrammar lets them through (see below)."""
    jsonschema.validate(json.loads(text, strict=False), schema)


@needs_xgrammar
def test_schemas_validate_greedy_and_sampled(llama_dir: Path) -> None:
    e = with_xgrammar(engine(llama_dir))
    schemas = SCHEMAS + MORE_SCHEMAS[:3]
    ps = prompts(len(schemas))
    params = [constrained(s, do_sample=i % 2 == 1, temperature=0.9, seed=i) for i, s in enumerate(schemas)]
    for schema, out in zip(schemas, e.generate(ps, params)):
        assert out.finish_reason == "eos_token", out.generated_text
        lenient_json(out.generated_text, schema)


@needs_xgrammar
def test_greedy_with_speculation_is_identical(llama_dir: Path) -> None:
    ps, params = prompts(3, seed=5), [constrained(s) for s in SCHEMAS]
    plain = with_xgrammar(spec_engine(llama_dir)).generate(ps, params)
    e = with_xgrammar(spec_engine(llama_dir, heads(64, 3, 0.0, seed=1)))
    spec = e.generate(ps, params)
    assert ids_of(spec) == ids_of(plain) and e.spec_steps > 0
    for schema, out in zip(SCHEMAS, spec):
        lenient_json(out.generated_text, schema)


@needs_xgrammar
def test_drafts_are_cut_and_masked_without_moving_the_matcher(llama_dir: Path) -> None:
    e = with_xgrammar(engine(llama_dir))
    ids = [t.id for t in e.generate(prompts(1), constrained(SCHEMAS[0]))[0].tokens]
    m = e.grammars.matcher(ResponseFormat("json_schema", SCHEMAS[0]))
    v = e.runner.vocab_size
    drafts = ids[:4]
    assert cut_drafts(m, drafts) == drafts and cut_drafts(m, [ids[1]]) == []  # not a "{"
    before = fill_bitmask([m], v)
    masks = draft_masks(m, drafts, v)
    assert torch.equal(fill_bitmask([m], v), before) and torch.equal(masks[0], before[0])
    for j, d in enumerate(drafts):
        assert (int(masks[j, d // 32]) >> (d % 32)) & 1, j
    assert not (int(before[0, (v - 1) // 32]) >> ((v - 1) % 32)) & 1  # past the tokenizer: never


@needs_xgrammar
def test_a_bad_schema_is_a_request_error(llama_dir: Path) -> None:
    e = with_xgrammar(engine(llama_dir))
    with pytest.raises(RequestError, match="response_format"):
        e.grammars.matcher(ResponseFormat("json_schema", {"type": "wat"}))


@needs_xgrammar
def test_raw_control_characters_in_strings_differ_from_llguidance(llama_dir: Path) -> None:
    """Why xgrammar 0.2.9 is not the default: its JSON strings accept raw control characters
    (U+0000-U+001F other than CR/LF), which JSON (RFC 8259) only allows escaped, so a strict parser
    (Python's `json.loads`, most JSON libraries) rejects the answer; llguidance refuses them.
    If this starts failing, xgrammar fixed it: update README's comparison."""
    e = engine(llama_dir)
    fmt = ResponseFormat("json_schema", SCHEMAS[0])
    xg = with_xgrammar(engine(llama_dir)).grammars
    for ctrl in ("\x01", "\x08", "\t"):
        ids = e.tokenizer.encode('{"name": "' + ctrl, add_special_tokens=False)
        assert xg.matcher(fmt).validate_tokens(ids) == len(ids)
        assert e.grammars.matcher(fmt).validate_tokens(ids) == len(ids) - 1
