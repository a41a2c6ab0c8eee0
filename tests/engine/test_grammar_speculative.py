"""Structured output with Medusa speculation: drafts are cut to what the grammar accepts, each
verified position is masked by the grammar state after the drafts before it, and greedy
constrained output is the same with speculation as without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.grammar import cut_drafts, draft_masks, fill_bitmask
from loraserve.engine.params import ResponseFormat, SamplingParams
from tests.engine.test_grammar import SCHEMAS, check_json, constrained, prompts
from tests.engine.test_speculative import engine, heads, ids_of


@pytest.mark.parametrize("scale", [0.0, 0.05])
def test_greedy_constrained_is_identical_with_and_without_speculation(
    llama_dir: Path, llama_adapters: list[Path], scale: float
) -> None:
    ads = [parse_peft_adapter(p) for p in llama_adapters[:2]]
    ps = prompts(6, seed=5)
    free = SamplingParams(max_new_tokens=16, ignore_eos_token=True)
    params = [constrained(SCHEMAS[i % 3]) if i % 3 != 2 else free for i in range(6)]
    adapters = [ads[i % 2] if i % 2 else None for i in range(6)]
    plain = engine(llama_dir).generate(ps, params, adapters)
    spec_engine = engine(llama_dir, heads(64, 3, scale, seed=1))
    spec = spec_engine.generate(ps, params, adapters)
    assert ids_of(spec) == ids_of(plain)
    for i, out in enumerate(spec):
        if i % 3 != 2:
            check_json(out.generated_text, SCHEMAS[i % 3])
    assert spec_engine.spec_steps > 0


def test_sampled_constrained_with_speculation_validates(llama_dir: Path) -> None:
    e = engine(llama_dir, heads(64, 3, 0.0, seed=2))
    ps = prompts(3, seed=6)
    params = [constrained(SCHEMAS[i], do_sample=True, temperature=0.8, seed=10 + i) for i in range(3)]
    for i, out in enumerate(e.generate(ps, params)):
        check_json(out.generated_text, SCHEMAS[i])


def test_drafts_that_follow_the_grammar_are_kept_and_masked_in(llama_dir: Path) -> None:
    """The constrained greedy answer itself as drafts: none is cut, every draft passes its
    position's mask, and the matcher ends where it started."""
    e = engine(llama_dir)
    out = e.generate(prompts(1), constrained(SCHEMAS[0]))[0]
    ids = [t.id for t in out.tokens]
    m = e.grammars.matcher(ResponseFormat("json_schema", SCHEMAS[0]))
    v = e.runner.vocab_size
    for start in range(0, len(ids) - 1, 3):
        drafts = ids[start : start + 4]
        assert cut_drafts(m, drafts) == drafts
        before = fill_bitmask([m], v)
        masks = draft_masks(m, drafts, v)
        assert torch.equal(fill_bitmask([m], v), before) and torch.equal(masks[0], before[0])
        for j, d in enumerate(drafts):
            assert (int(masks[j, d // 32]) >> (d % 32)) & 1, (start, j)
        m.consume_tokens(ids[start : start + 3])
    assert json.loads(out.generated_text)
    assert cut_drafts(e.grammars.matcher(ResponseFormat("json_object")), [ids[1]]) == []  # not a "{"


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_accepted_drafts_advance_the_grammar(llama_dir: Path, wrong_every: int) -> None:
    """Oracle drafts (the constrained greedy answer, every `wrong_every`-th draft replaced by a
    wrong token): drafts are accepted and skipped, the output is the same as without drafts."""
    ps = prompts(3, seed=8)
    params = [constrained(SCHEMAS[i]) for i in range(3)]
    ref = ids_of(engine(llama_dir).generate(ps, params))
    e = engine(llama_dir, heads(64, 3, 0.0, seed=1))
    by_prompt = {tuple(p): r for p, r in zip(ps, ref)}
    propose = e.speculators.propose

    def oracle(hidden, rows, project, max_total):  # type: ignore[no-untyped-def]
        propose(hidden, rows, project, max_total)
        for seq, _ in rows:
            n = len(seq.output_ids)
            drafts = by_prompt[tuple(seq.prompt_ids)][n : n + 3]
            if wrong_every and n % wrong_every == 0 and drafts:
                drafts = drafts[:1] + [(drafts[0] + 1) % 256] + drafts[2:]
            seq.drafts = drafts

    e.speculators.propose = oracle  # type: ignore[method-assign]
    outs = e.generate(ps, params)
    assert ids_of(outs) == ref
    assert sum(t.skipped for o in outs for t in o.tokens) > len(ref[0]) // 2
    for i, out in enumerate(outs):
        check_json(out.generated_text, SCHEMAS[i])
