"""Chunked prefill: long prompts fed over several steps beside the decodes give the same outputs
as whole prefills (mixed adapters, with prefix caching, under preemption, with Medusa) and the
same tokens as transformers + peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.engine.test_prefix_cache import GREEDY, assert_no_leak, assert_same, run_in_waves, shared_prompts
from tests.engine.test_speculative import heads
from tests.fixtures.native import native_kernel_or_skip
from tests.fixtures.tiny_models import hf_greedy, load_hf_model


def engine(path: Path, chunk: int | None, caching: bool = False, **kw) -> Engine:
    """`chunk`: prompt tokens per step (None: whole prompts)."""
    kw.setdefault("kv_cache_memory_bytes", 16 << 20)
    kw.setdefault("adapter_memory_bytes", 64 << 20)
    kw.setdefault("max_lora_rank", 16)
    return Engine.from_pretrained(
        path,
        EngineConfig(
            prefix_caching=caching, chunked_prefill=chunk is not None, prefill_chunk_tokens=chunk, **kw
        ),
    )


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_chunked_mixed_adapter_batch_matches_whole_prefills(
    llama_dir: Path, llama_adapters: list[Path], kernels: str
) -> None:
    """Chunks of 7 tokens (not a block multiple), adapters and the base model mixed: the same
    greedy tokens and logprobs as whole prefills, on both backends."""
    if kernels == "native":
        native_kernel_or_skip()
    native = kernels == "native"
    ads: list[LoraAdapter | None] = [None, *(parse_peft_adapter(p) for p in llama_adapters[:3])]
    ps = shared_prompts(8, prefix_len=45, seed=2)
    rows = [ads[i % 4] for i in range(8)]
    expected = engine(llama_dir, None, native_kernels=native).generate(ps, GREEDY, rows)
    e = engine(llama_dir, 7, native_kernels=native)
    assert_same(e.generate(ps, GREEDY, rows), expected)
    assert_no_leak(e)


def test_chunks_start_after_a_cached_prefix(llama_dir: Path, llama_adapters: list[Path]) -> None:
    """Prefix caching and chunking compose: later prompts skip the cached blocks and chunk the rest."""
    ad = parse_peft_adapter(llama_adapters[3])
    ps = shared_prompts(6, prefix_len=50, seed=4)
    ps = [p + list(range(3 + i, 40 + i)) for i, p in enumerate(ps)]  # long unique tails: several chunks
    rows = [ad if i % 2 else None for i in range(6)]
    expected = engine(llama_dir, None).generate(ps, GREEDY, rows)
    e = engine(llama_dir, 11, caching=True)
    assert_same(run_in_waves(e, ps, rows, GREEDY), expected)
    assert e.stats()["prefix_cache_hits"] > 0
    assert_no_leak(e)


def test_decodes_continue_while_a_long_prompt_is_chunked(llama_dir: Path) -> None:
    """Every step while a long prompt is admitted: each running stream gets its token, and the
    step's prompt tokens cost at most the chunk budget, counting their attention context (so
    chunks shrink as the prompt goes deeper)."""
    e = engine(llama_dir, 16)
    params = SamplingParams(max_new_tokens=40, ignore_eos_token=True)
    running = [e.add_request(p, params) for p in shared_prompts(4, prefix_len=10, seed=6)]
    while any(not e._seqs[r].output_ids for r in running):
        e.step()
    long_prompt = shared_prompts(1, prefix_len=150, seed=7)[0]
    rid = e.add_request(long_prompt, params)
    seq, cost_ctx = e._seqs[rid], e.scheduler.context_cost
    chunks = []
    while not seq.output_ids:
        ctx = seq.num_cached
        outs = {o.request_id for o in e.step()}
        assert set(running) <= outs  # nobody stalls for the long prompt
        assert e.last_batch_size == 5
        chunks.append(seq.num_cached - ctx if seq.num_cached < len(long_prompt) else len(long_prompt) - ctx)
        assert chunks[-1] == 1 or chunks[-1] * (1 + ctx / cost_ctx) <= 16 + 1e-9
    assert sum(chunks) == len(long_prompt)
    assert chunks[0] == 16 and chunks[-2] < chunks[0]  # deeper chunks take fewer tokens
    while e.has_unfinished():
        e.step()
    assert_no_leak(e)


def test_chunked_prefill_under_preemption(llama_dir: Path, llama_adapters: list[Path]) -> None:
    ad = parse_peft_adapter(llama_adapters[1])
    ps = shared_prompts(6, prefix_len=33, seed=3)
    rows = [ad if i % 2 else None for i in range(6)]
    params = SamplingParams(max_new_tokens=30, ignore_eos_token=True)
    expected = engine(llama_dir, None).generate(ps, params, rows)
    small = engine(
        llama_dir,
        9,
        caching=True,
        kv_cache_memory_bytes=None,
        max_batch_total_tokens=160,
        max_total_tokens=128,
    )
    assert_same(small.generate(ps, params, rows), expected)
    assert small.stats()["preemptions"] > 0
    assert_no_leak(small)


@pytest.mark.parametrize("scale", [0.0, 0.05])
def test_medusa_with_chunking_and_caching_is_lossless(
    llama_dir: Path, llama_adapters: list[Path], scale: float
) -> None:
    ads: list[LoraAdapter | None] = [None, parse_peft_adapter(llama_adapters[0])]
    ps = shared_prompts(6, prefix_len=40, seed=8)
    rows = [ads[i % 2] for i in range(6)]
    params = SamplingParams(max_new_tokens=20, ignore_eos_token=True)
    expected = engine(llama_dir, None).generate(ps, params, rows)
    e = engine(llama_dir, 13, caching=True)
    e.set_default_speculator(heads(64, 3, scale, seed=1))
    got = run_in_waves(e, ps, rows, params)
    assert [[t.id for t in r.tokens] for r in got] == [[t.id for t in r.tokens] for r in expected]
    assert e.spec_steps > 0 and e.stats()["prefix_cache_hits"] > 0
    assert_no_leak(e)


def test_decoder_input_details_are_not_chunked(llama_dir: Path) -> None:
    ps = shared_prompts(2, prefix_len=40, seed=5)
    details = SamplingParams(max_new_tokens=4, ignore_eos_token=True, prefill_logprobs=True)
    ref = engine(llama_dir, None).generate(ps, details)
    got = engine(llama_dir, 8, caching=True).generate(ps, details)
    assert_same(got, ref)
    for g, r in zip(got, ref):
        assert len(g.prefill) == len(r.prefill)
        lp = [p.logprob or 0.0 for p in g.prefill]
        torch.testing.assert_close(torch.tensor(lp), torch.tensor([p.logprob or 0.0 for p in r.prefill]))


def test_caching_and_chunking_match_transformers_and_peft(
    llama_dir: Path, llama_adapters: list[Path]
) -> None:
    """The oracle: with both on, greedy tokens equal transformers (base rows) and peft (adapter rows)."""
    from peft import PeftModel

    ps = shared_prompts(4, prefix_len=35, seed=12)
    rows = [None, llama_adapters[1], None, llama_adapters[1]]
    e = engine(llama_dir, 10, caching=True)
    got = run_in_waves(e, ps, [parse_peft_adapter(p) if p else None for p in rows], GREEDY)
    assert e.stats()["prefix_cache_hits"] > 0
    base = load_hf_model(llama_dir)
    peft = PeftModel.from_pretrained(load_hf_model(llama_dir), llama_adapters[1]).eval()
    for ids, path, res in zip(ps, rows, got):
        assert [t.id for t in res.tokens] == hf_greedy(peft if path else base, ids, GREEDY.max_new_tokens)
    assert_no_leak(e)
