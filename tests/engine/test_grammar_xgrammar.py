"""The xgrammar backend (engine/grammar_xgrammar.py) behind the engine's grammar interface: the
same schemas validate, Medusa drafts are cut and masked per position, bad schemas are refused.
Skipped where the optional extra is not installed (`pip install -e '.[xgrammar]'`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import cut_drafts, draft_masks, fill_bitmask
from loraserve.engine.params import ResponseFormat
from tests.engine.test_grammar import MORE_SCHEMAS, SCHEMAS, constrained, engine, prompts
from tests.engine.test_speculative import engine as spec_engine
from tests.engine.test_speculative import heads, ids_of

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
from loraserve.engine.grammar_xgrammar import XGrammarCompiler  # noqa: E402


def with_xgrammar(e: Engine) -> Engine:
    e.grammars = XGrammarCompiler(e.tokenizer, e.runner.vocab_size, sorted(e.eos_ids))
    return e


def lenient_json(text: str, schema: dict) -> None:
    """Parse allowing raw control characters in strings: xgrammar lets them through (see below)."""
    jsonschema.validate(json.loads(text, strict=False), schema)


def test_schemas_validate_greedy_and_sampled(llama_dir: Path) -> None:
    e = with_xgrammar(engine(llama_dir))
    schemas = SCHEMAS + MORE_SCHEMAS[:3]
    ps = prompts(len(schemas))
    params = [constrained(s, do_sample=i % 2 == 1, temperature=0.9, seed=i) for i, s in enumerate(schemas)]
    for schema, out in zip(schemas, e.generate(ps, params)):
        assert out.finish_reason == "eos_token", out.generated_text
        lenient_json(out.generated_text, schema)


def test_greedy_with_speculation_is_identical(llama_dir: Path) -> None:
    ps, params = prompts(3, seed=5), [constrained(s) for s in SCHEMAS]
    plain = with_xgrammar(spec_engine(llama_dir)).generate(ps, params)
    e = with_xgrammar(spec_engine(llama_dir, heads(64, 3, 0.0, seed=1)))
    spec = e.generate(ps, params)
    assert ids_of(spec) == ids_of(plain) and e.spec_steps > 0
    for schema, out in zip(SCHEMAS, spec):
        lenient_json(out.generated_text, schema)


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


def test_a_bad_schema_is_a_request_error(llama_dir: Path) -> None:
    e = with_xgrammar(engine(llama_dir))
    with pytest.raises(RequestError, match="response_format"):
        e.grammars.matcher(ResponseFormat("json_schema", {"type": "wat"}))


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
