"""Prefix caching: the same outputs with and without it, blocks shared only within one adapter
identity, eviction that never frees a held block, and no leaked blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.engine.test_speculative import heads
from tests.fixtures.native import native_kernel_or_skip

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos_token=True)


def engine(path: Path, caching: bool, **kw) -> Engine:
    kw.setdefault("kv_cache_memory_bytes", 16 << 20)
    kw.setdefault("adapter_memory_bytes", 64 << 20)
    kw.setdefault("max_lora_rank", 16)
    return Engine.from_pretrained(path, EngineConfig(prefix_caching=caching, **kw))


def shared_prompts(n: int, prefix_len: int = 40, seed: int = 0) -> list[list[int]]:
    """`n` prompts that share a `prefix_len`-token system prompt and end differently."""
    g = torch.Generator().manual_seed(seed)
    head = [1] + torch.randint(3, 380, (prefix_len - 1,), generator=g).tolist()
    return [head + torch.randint(3, 380, (3 + i % 5,), generator=g).tolist() for i in range(n)]


def tokens_and_logprobs(results) -> tuple[list[list[int]], list[list[float]]]:
    return [[t.id for t in r.tokens] for r in results], [[t.logprob for t in r.tokens] for r in results]


def assert_same(got, expected) -> None:
    """Greedy tokens identical, logprobs equal within fp32 tolerance."""
    ids, lps = tokens_and_logprobs(got)
    ref_ids, ref_lps = tokens_and_logprobs(expected)
    assert ids == ref_ids
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4, rtol=0)


def assert_no_leak(e: Engine) -> None:
    assert e.runner.blocks.num_free == e.runner.blocks.capacity
    assert e.runner.slots.in_use() == 0 and not e.has_unfinished()


def run_in_waves(e: Engine, prompts: list[list[int]], adapters: list, params: SamplingParams) -> list:
    """First one request per distinct prompt head, then the rest: the later ones find its blocks."""
    first = e.generate(prompts[:1], params, adapters[:1])
    return first + e.generate(prompts[1:], params, adapters[1:])


# ---- the block manager alone --------------------------------------------------------------------


def test_freed_cached_blocks_are_reused_and_evicted_only_on_demand() -> None:
    bm = BlockManager(num_blocks=9, block_size=4)  # 8 usable blocks
    addrs = [bytes([i]) * 16 for i in range(3)]
    a: list[int] = []
    bm.grow(a, 12)
    bm.address(a, addrs, 0, computed=False)
    assert bm.match(addrs) == ([], True)  # being computed: a second request waits for it
    bm.address(a, addrs, 0, computed=True)
    assert bm.match(addrs) == (a, False)
    b = bm.share(a[:2])  # a second holder of the first two blocks
    bm.free(a)
    assert bm.num_free == 8 - 2 and bm.num_cached == 1  # a[2] parked, a[0:2] held by b
    held = set(b)
    others: list[list[int]] = []
    while bm.num_free:  # fill the cache: every free block, then the parked one, is handed out
        t: list[int] = []
        bm.grow(t, 4)
        others.append(t)
        assert not held & set(t)  # a block somebody holds is never handed out again
    assert bm.evictions == 1 and bm.match(addrs) == (b, False)  # the held prefix is still cached
    for t in others:
        bm.free(t)
    bm.free(b)
    assert bm.num_free == bm.capacity and bm.num_cached == 2


def test_a_poisoned_shared_block_is_zeroed_only_when_its_last_holder_lets_go() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    a: list[int] = []
    bm.grow(a, 8)
    bm.address(a, [b"x" * 16, b"y" * 16], 0, computed=True)
    b = bm.share(a[:1])
    private = a[1:]
    bm.poison(a)
    bm.free(a)
    assert bm.take_dirty() == private
    assert bm.match([b"x" * 16]) == ([], False)  # nobody new reads it
    shared = list(b)
    bm.free(b)
    assert bm.take_dirty() == shared and bm.num_free == bm.capacity


# ---- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_mixed_adapter_batch_is_the_same_with_and_without_caching(
    llama_dir: Path, llama_adapters: list[Path], kernels: str
) -> None:
    """Base rows, adapter rows and a Medusa-only adapter's rows over shared system prompts: the
    cache is hit, and greedy tokens and logprobs equal the uncached run on both backends."""
    if kernels == "native":
        native_kernel_or_skip()
    native = kernels == "native"
    ads: list[LoraAdapter | None] = [None, *(parse_peft_adapter(p) for p in llama_adapters[:3])]
    ps = shared_prompts(12, prefix_len=37)
    rows = [ads[i % 4] for i in range(12)]
    plain = engine(llama_dir, False, native_kernels=native)
    expected = run_in_waves(plain, ps, rows, GREEDY)
    cached = engine(llama_dir, True, native_kernels=native)
    got = run_in_waves(cached, ps, rows, GREEDY)
    assert_same(got, expected)
    s = cached.stats()
    # the base model's 2 prefix blocks serve the first wave... each adapter computes its own once
    assert s["prefix_cache_hits"] >= 2 * 8 and s["prefix_cache_misses"] > 0
    assert plain.stats()["prefix_cache_hits"] == 0
    assert_no_leak(cached)
    assert_no_leak(plain)


def test_two_adapters_with_one_prompt_never_share_blocks(llama_dir: Path, llama_adapters: list[Path]) -> None:
    e = engine(llama_dir, True)
    a, b = (parse_peft_adapter(p) for p in llama_adapters[:2])
    ids = shared_prompts(1, prefix_len=48)[0]
    e.generate([ids], GREEDY, [a])
    assert e.stats()["prefix_cache_hits"] == 0
    e.generate([ids], GREEDY, [b])  # same tokens, other adapter: nothing to reuse
    e.generate([ids], GREEDY, [None])  # nor for the base model
    assert e.stats()["prefix_cache_hits"] == 0
    e.generate([ids], GREEDY, [b])  # the same adapter again: its own blocks
    assert e.stats()["prefix_cache_hits"] == 3
    # and while they run side by side their tables are disjoint
    ra, rb = e.add_request(ids, GREEDY, a), e.add_request(ids, GREEDY, b)
    e.step()
    ta, tb = (e._seqs[r].block_table for r in (ra, rb))
    assert not set(ta) & set(tb)
    while e.has_unfinished():
        e.step()
    assert_no_leak(e)


def test_a_reloaded_adapter_with_new_weights_does_not_reuse_old_blocks(
    llama_dir: Path, llama_adapters: list[Path]
) -> None:
    """The store keys adapters `source:id@revision`; new weights are a new revision, a new key."""
    e = engine(llama_dir, True)
    old = parse_peft_adapter(llama_adapters[0], key="local:/x@rev1")
    new = parse_peft_adapter(llama_adapters[1], key="local:/x@rev2")
    ids = shared_prompts(1, prefix_len=40)[0]
    fresh = engine(llama_dir, False).generate([ids], GREEDY, [new])
    e.generate([ids], GREEDY, [old])
    assert_same(e.generate([ids], GREEDY, [new]), fresh)
    assert e.stats()["prefix_cache_hits"] == 0


def test_the_base_model_and_a_medusa_only_adapter_share_blocks(llama_dir: Path) -> None:
    """Medusa heads draft but do not change K/V: requests naming Medusa-only heads reuse the base
    model's blocks, and their greedy output is still the base model's."""
    e = engine(llama_dir, True)
    e.set_default_speculator(heads(64, 3, 0.0, seed=4, key="default-heads"))
    medusa_only = LoraAdapter(
        key="hub:org/medusa@abc",
        rank=0,
        alpha=0.0,
        use_rslora=False,
        target_modules=(),
        modules={},
        medusa=heads(64, 2, 0.0, seed=5, key="hub:org/medusa@abc"),
    )
    ids = shared_prompts(1, prefix_len=48)[0]
    base_out = e.generate([ids], GREEDY, [None])
    assert e.stats()["prefix_cache_hits"] == 0
    medusa_out = e.generate([ids], GREEDY, [medusa_only])
    assert e.stats()["prefix_cache_hits"] == 3
    assert [t.id for t in medusa_out[0].tokens] == [t.id for t in base_out[0].tokens]
    assert_no_leak(e)


def test_preemption_recompute_with_caching_matches(llama_dir: Path, llama_adapters: list[Path]) -> None:
    """A cache too small for everyone: sequences are preempted and recomputed, cached blocks are
    evicted for new ones, and every output equals the big uncached engine's."""
    ad = parse_peft_adapter(llama_adapters[1])
    ps = shared_prompts(6, prefix_len=33, seed=3)
    rows = [ad if i % 2 else None for i in range(6)]
    params = SamplingParams(max_new_tokens=30, ignore_eos_token=True)
    expected = engine(llama_dir, False).generate(ps, params, rows)
    small = engine(
        llama_dir, True, kv_cache_memory_bytes=None, max_batch_total_tokens=160, max_total_tokens=128
    )
    assert small.runner.blocks.capacity == 10
    got = small.generate(ps, params, rows)
    assert_same(got, expected)
    s = small.stats()
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0 and s["prefix_cache_evictions"] > 0
    assert_no_leak(small)


def test_eviction_under_pressure_never_takes_a_block_in_use(llama_dir: Path) -> None:
    """Fill the cache with parked blocks of finished prompts, then run a batch that needs them all:
    whatever is evicted, no running sequence ever holds a block another one was handed."""
    e = engine(llama_dir, True, kv_cache_memory_bytes=None, max_batch_total_tokens=256, max_total_tokens=128)
    filler = shared_prompts(6, prefix_len=60, seed=9)
    e.generate([[7 + i, *p[1:]] for i, p in enumerate(filler)], GREEDY)  # six distinct prefixes
    assert e.stats()["prefix_cache_blocks"] > 8
    ps = shared_prompts(8, prefix_len=40, seed=10)
    params = SamplingParams(max_new_tokens=24, ignore_eos_token=True)
    expected = engine(llama_dir, False).generate(ps, params)
    ids = [e.add_request(p, params) for p in ps]
    got: dict[str, list[int]] = {r: [] for r in ids}
    while e.has_unfinished():
        for out in e.step():
            got[out.request_id].extend(t.id for t in out.tokens)
        tables = [s.block_table for s in e.scheduler.running]
        held = [b for t in tables for b in t]
        shared = [b for b in set(held) if held.count(b) > 1]
        for b in held:  # a held block is never parked (evictable) or free
            assert b not in e.runner.blocks._lru and b not in e.runner.blocks._free
        for b in shared:  # a shared block is a full, addressed prefix block
            assert b in e.runner.blocks._addr
    assert [got[r] for r in ids] == [[t.id for t in r.tokens] for r in expected]
    assert e.stats()["prefix_cache_evictions"] > 0
    assert_no_leak(e)


def test_identical_prompts_arriving_together_compute_the_prefix_once(llama_dir: Path) -> None:
    """best_of/n siblings and bursts of one prompt: the first computes, the rest wait one step and
    share its blocks."""
    e = engine(llama_dir, True)
    ids = shared_prompts(1, prefix_len=50)[0]
    params = SamplingParams(max_new_tokens=6, ignore_eos_token=True, do_sample=True, seed=3)
    outs = e.generate([ids] * 4, params)
    s = e.stats()
    assert s["prefix_cache_hits"] == 3 * 3 and s["prefix_cache_misses"] == 3
    assert all(len(o.tokens) == 6 for o in outs)
    assert_no_leak(e)


def test_decoder_input_details_compute_the_whole_prompt(llama_dir: Path, llama_adapters: list[Path]) -> None:
    """Prompt logprobs need logits at every prompt position: such requests skip the cache lookup
    and compute everything, so their prefill details equal an uncached run's."""
    ad = parse_peft_adapter(llama_adapters[2])
    ps = shared_prompts(3, prefix_len=40, seed=5)
    details = SamplingParams(max_new_tokens=5, ignore_eos_token=True, prefill_logprobs=True)
    ref = engine(llama_dir, False).generate(ps, details, [ad] * 3)
    e = engine(llama_dir, True)
    e.generate(ps[:1], GREEDY, [ad])  # the prefix is cached...
    got = e.generate(ps, details, [ad] * 3)
    assert e.stats()["prefix_cache_hits"] == 0  # ...but these did not use it
    assert_same(got, ref)
    for g, r in zip(got, ref):
        assert [p.id for p in g.prefill] == [p.id for p in r.prefill] == ps[got.index(g)]
        lp = [p.logprob if p.logprob is not None else 0.0 for p in g.prefill]
        ref_lp = [p.logprob if p.logprob is not None else 0.0 for p in r.prefill]
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)
    assert_no_leak(e)


def test_a_failed_request_leaves_no_poisoned_block_in_the_cache(
    llama_dir: Path, llama_adapters: list[Path]
) -> None:
    """An adapter producing NaN fails its request; its blocks leave the cache and are zeroed, so the
    next request on the same prompt (another adapter, then the base) is unaffected."""
    bad = parse_peft_adapter(llama_adapters[0], key="local:/bad@1")
    for m in bad.modules.values():
        m.b.fill_(float("nan"))
    e = engine(llama_dir, True)
    ids = shared_prompts(1, prefix_len=48)[0]
    ref = engine(llama_dir, False).generate([ids], GREEDY)
    assert e.generate([ids], GREEDY, [bad])[0].finish_reason == "error"
    assert_same(e.generate([ids], GREEDY), ref)
    for k, v in e.runner.kv_caches:
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert_no_leak(e)
