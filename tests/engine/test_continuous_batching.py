"""Continuous batching, preemption, abort, adapter slots and seeded sampling, on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loraserve.adapters.lora_weights import LoraAdapter, LoraModuleWeights
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.params import SamplingParams
from tests.fixtures.native import native_kernel_or_skip

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos_token=True)


def engine(path: Path, **kw) -> Engine:
    kw.setdefault("kv_cache_memory_bytes", 32 << 20)
    kw.setdefault("adapter_memory_bytes", 64 << 20)
    kw.setdefault("max_lora_rank", 16)
    return Engine.from_pretrained(path, EngineConfig(**kw))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [1] + torch.randint(3, 380, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def alone(e: Engine, ids: list[int], params: SamplingParams, adapter: LoraAdapter | None = None) -> list[int]:
    return [t.id for t in e.generate([ids], params, [adapter])[0].tokens]


def random_adapter(cfg, key: str, seed: int, rank: int = 4) -> LoraAdapter:
    """An in-memory adapter: cheap enough to make hundreds (slot cycling tests)."""
    g = torch.Generator().manual_seed(seed)
    shapes = cfg.linear_shapes()
    modules = {}
    for layer in range(cfg.num_hidden_layers):
        for m in ("q_proj", "v_proj", "down_proj"):
            fin, fout = shapes[m]
            modules[(layer, m)] = LoraModuleWeights(
                a=torch.randn(rank, fin, generator=g) * 0.3,
                b=torch.randn(fout, rank, generator=g) * 0.3,
                scale=2.0,
            )
    return LoraAdapter(
        key=key,
        rank=rank,
        alpha=2.0 * rank,
        use_rslora=False,
        target_modules=("q_proj", "v_proj", "down_proj"),
        modules=modules,
    )


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_requests_arriving_mid_decode_match_alone(
    llama_dir: Path, llama_adapters: list[Path], kernels: str
) -> None:
    """Mixed steps (decode rows beside prefills) give the tokens each request gets alone, on
    both the native CPU kernels and the PyTorch path."""
    if kernels == "native":
        native_kernel_or_skip()
    e = engine(llama_dir, native_kernels=kernels == "native")
    ads = [parse_peft_adapter(p) for p in llama_adapters[:4]]
    ps = prompts(8)
    expected = [alone(e, p, GREEDY, ads[i % 4] if i % 3 else None) for i, p in enumerate(ps)]
    got: dict[str, list[int]] = {}
    ids: list[str] = []
    for i, p in enumerate(ps):  # a new request joins every other step while the others decode
        ids.append(e.add_request(p, GREEDY, ads[i % 4] if i % 3 else None))
        got[ids[-1]] = []
        for _ in range(2):
            for out in e.step():
                got[out.request_id].extend(t.id for t in out.tokens)
    while e.has_unfinished():
        for out in e.step():
            got[out.request_id].extend(t.id for t in out.tokens)
    assert [got[r] for r in ids] == expected
    assert e.runner.blocks.num_free == e.runner.blocks.capacity
    assert e.runner.slots.in_use() == 0


def test_out_of_blocks_queues_and_preempts_without_failing(llama_dir: Path) -> None:
    big = engine(llama_dir)
    ps = prompts(6, seed=3)
    params = SamplingParams(max_new_tokens=30, ignore_eos_token=True)
    expected = [alone(big, p, params) for p in ps]
    # 8 blocks of 16 tokens: at most ~2 of these requests fit at once
    small = engine(llama_dir, kv_cache_memory_bytes=None, max_batch_total_tokens=128, max_total_tokens=128)
    assert small.runner.blocks.capacity == 8
    results = small.generate(ps, params)
    assert [[t.id for t in r.tokens] for r in results] == expected
    assert small.runner.blocks.num_free == small.runner.blocks.capacity


def test_abort_frees_blocks_and_slot(llama_dir: Path, llama_adapters: list[Path]) -> None:
    e = engine(llama_dir)
    rid = e.add_request(
        prompts(1)[0], SamplingParams(max_new_tokens=50), parse_peft_adapter(llama_adapters[0])
    )
    e.step()
    e.step()
    assert e.runner.blocks.num_free < e.runner.blocks.num_blocks and e.runner.slots.in_use() == 1
    assert e.abort(rid)
    assert e.runner.blocks.num_free == e.runner.blocks.capacity and e.runner.slots.in_use() == 0
    assert not e.has_unfinished()


def test_seeded_sampling_is_reproducible_across_batch_compositions(
    llama_dir: Path, llama_adapters: list[Path]
) -> None:
    e = engine(llama_dir)
    ad = parse_peft_adapter(llama_adapters[1])
    p = prompts(1, seed=9)[0]
    params = SamplingParams(
        max_new_tokens=20,
        do_sample=True,
        temperature=1.3,
        top_k=50,
        top_p=0.95,
        seed=1234,
        repetition_penalty=1.1,
        ignore_eos_token=True,
    )
    solo = alone(e, p, params, ad)
    others = prompts(5, seed=10)
    noise = [
        SamplingParams(max_new_tokens=n, do_sample=True, seed=s, ignore_eos_token=True)
        for n, s in zip((5, 25, 3, 17, 9), range(5))
    ]
    batch = e.generate(
        [*others[:2], p, *others[2:]],
        [*noise[:2], params, *noise[2:]],
        [None, ad, ad, None, parse_peft_adapter(llama_adapters[2]), None],
    )
    assert [t.id for t in batch[2].tokens] == solo
    unseeded = SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.3, ignore_eos_token=True)
    a, b = e.generate([p, p], unseeded)
    assert a.seed != b.seed  # a random seed is drawn and reported when none is given
    assert [t.id for t in a.tokens] != [t.id for t in b.tokens]


def test_many_adapters_cycle_through_few_slots(llama_dir: Path) -> None:
    e = engine(llama_dir, max_active_adapters=8, adapter_cycle_time_s=0.0)
    ref = engine(llama_dir, max_active_adapters=1)
    cfg = e.model_config
    ads = [random_adapter(cfg, f"rand-{i}", seed=i) for i in range(200)]
    ps = prompts(200, seed=5)
    params = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    results = e.generate(ps, params, ads)
    assert e.runner.slots.num_slots == 8 and e.runner.slots.loads >= 200
    for i in range(0, 200, 20):  # spot-check against the adapter run alone
        assert [t.id for t in results[i].tokens] == alone(ref, ps[i], params, ads[i])
    assert e.runner.blocks.num_free == e.runner.blocks.capacity and e.runner.slots.in_use() == 0


def test_popular_adapter_does_not_starve_a_rare_one(llama_dir: Path) -> None:
    e = engine(llama_dir, max_active_adapters=1, adapter_cycle_time_s=0.0)
    popular = random_adapter(e.model_config, "popular", seed=1)
    rare = random_adapter(e.model_config, "rare", seed=2)
    params = SamplingParams(max_new_tokens=6, ignore_eos_token=True)
    for p in prompts(4, seed=1):
        e.add_request(p, params, popular)
    rare_id = e.add_request(prompts(1, seed=2)[0], params, rare)
    finished: list[str] = []
    for _ in range(200):  # keep the popular adapter busy with a steady stream of new requests
        for out in e.step():
            if out.finished:
                finished.append(out.request_id)
        if rare_id in finished:
            break
        e.add_request(prompts(1, seed=len(finished) + 50)[0], params, popular)
    assert rare_id in finished


def test_non_finite_logits_fail_only_that_request(llama_dir: Path) -> None:
    e = engine(llama_dir)
    poison = random_adapter(e.model_config, "poison", seed=3)
    for w in poison.modules.values():
        w.b.fill_(math.inf)
    ps = prompts(3, seed=4)
    good = alone(e, ps[0], GREEDY)
    results = e.generate(ps, GREEDY, [None, poison, None])
    assert [t.id for t in results[0].tokens] == good
    assert results[1].finish_reason == "error" and "non-finite" in (results[1].error or "")
    assert results[2].finish_reason == "length"
    assert e.runner.blocks.num_free == e.runner.blocks.capacity and e.runner.slots.in_use() == 0


def test_out_of_vocabulary_prompt_ids_are_refused_up_front(llama_dir: Path) -> None:
    import pytest

    e = engine(llama_dir)
    for bad in ([1, 2, 10_000], [-1, 5]):
        with pytest.raises(RequestError, match="vocabulary"):
            e.add_request(bad, GREEDY)
    assert not e.has_unfinished()


def test_watermark_biases_the_green_list(llama_dir: Path) -> None:
    """LoRAX/TGI watermarking: far more than gamma=50% of the sampled tokens are 'green'."""
    from loraserve.engine.watermark import GAMMA, greenlist

    e = engine(llama_dir)
    ps = prompts(6, seed=40)

    def green_fraction(watermark: bool) -> float:
        params = [
            SamplingParams(
                max_new_tokens=40, do_sample=True, seed=s, watermark=watermark, ignore_eos_token=True
            )
            for s in range(len(ps))
        ]
        hits = total = 0
        for p, r in zip(ps, e.generate(ps, params)):
            ids = p + [t.id for t in r.tokens]
            for prev, tok in zip(ids[len(p) - 1 : -1], ids[len(p) :]):
                hits += int(tok in set(greenlist(prev, e.runner.vocab_size, e.device).tolist()))
                total += 1
        return hits / total

    marked, plain = green_fraction(True), green_fraction(False)
    assert marked > GAMMA + 0.15 and marked > plain + 0.1, (marked, plain)
