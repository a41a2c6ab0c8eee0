"""Medusa speculative decoding: lossless for greedy, distribution-preserving for sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.medusa_format import MedusaHeads
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.params import SamplingParams
from loraserve.engine.speculative import verify_drafts
from tests.engine.test_continuous_batching import prompts


def heads(hidden: int, num_heads: int, scale: float, seed: int, key: str = "medusa") -> MedusaHeads:
    """scale 0: every head returns the base logits ('the next token repeats'), which a tiny random
    model often does in its loops, so drafts are sometimes right and sometimes wrong."""
    g = torch.Generator().manual_seed(seed)
    return MedusaHeads(
        key=key,
        num_heads=num_heads,
        num_layers=1,
        version=2,
        weight=torch.randn(num_heads, 1, hidden, hidden, generator=g) * scale,
        bias=torch.zeros(num_heads, 1, hidden),
    )


def engine(path: Path, speculator: MedusaHeads | None = None, **kw) -> Engine:
    e = Engine.from_pretrained(
        path,
        EngineConfig(kv_cache_memory_bytes=32 << 20, adapter_memory_bytes=64 << 20, max_lora_rank=16, **kw),
    )
    e.set_default_speculator(speculator)
    return e


def ids_of(results) -> list[list[int]]:
    return [[t.id for t in r.tokens] for r in results]


@pytest.mark.parametrize("scale", [0.0, 0.05])
def test_greedy_is_identical_with_and_without_speculation(
    llama_dir: Path, llama_adapters: list[Path], scale: float
) -> None:
    plain = engine(llama_dir)
    spec = engine(llama_dir, heads(64, 4, scale, seed=1))
    ps = prompts(12, seed=21)
    ads: list[LoraAdapter | None] = [parse_peft_adapter(p) for p in llama_adapters[:3]]
    rows = [ads[i % 4] if i % 4 < 3 else None for i in range(12)]
    params = SamplingParams(max_new_tokens=24, ignore_eos_token=True)
    expected = ids_of(plain.generate(ps, params, rows))
    got = spec.generate(ps, params, rows)
    assert ids_of(got) == expected
    assert all(len(r.tokens) == 24 and r.finish_reason == "length" for r in got)
    assert spec.spec_steps > 0
    if scale == 0.0:
        assert spec.spec_tokens > spec.spec_steps  # some drafts were really accepted (multi-token steps)
    assert spec.runner.blocks.num_free == spec.runner.blocks.capacity and spec.runner.slots.in_use() == 0


def test_stop_sequences_and_length_behave_as_without_speculation(llama_dir: Path) -> None:
    plain = engine(llama_dir)
    spec = engine(llama_dir, heads(64, 3, 0.0, seed=2))
    p = prompts(1, seed=30)[0]
    base = plain.generate([p], SamplingParams(max_new_tokens=30, ignore_eos_token=True))[0]
    stop = base.generated_text[8:12] if len(base.generated_text) > 12 else base.generated_text[-2:]
    for params in (
        SamplingParams(max_new_tokens=7, ignore_eos_token=True),
        SamplingParams(max_new_tokens=30, ignore_eos_token=True, stop=[stop]),
    ):
        a = plain.generate([p], params)[0]
        b = spec.generate([p], params)[0]
        assert (b.generated_text, b.finish_reason, ids_of([b])) == (
            a.generated_text,
            a.finish_reason,
            ids_of([a]),
        )


def test_per_request_heads_need_a_default_speculator(llama_dir: Path) -> None:
    e = engine(llama_dir)
    own = LoraAdapter(
        key="m",
        rank=0,
        alpha=0,
        use_rslora=False,
        target_modules=(),
        modules={},
        medusa=heads(64, 2, 0.0, seed=3),
    )
    with pytest.raises(RequestError, match="default Medusa adapter"):
        e.add_request([1, 2, 3], SamplingParams(), own)
    e.set_default_speculator(heads(64, 3, 0.05, seed=4))
    p = prompts(2, seed=5)
    params = SamplingParams(max_new_tokens=16, ignore_eos_token=True)
    ref = ids_of(engine(llama_dir).generate(p, params))
    # a request with its own (v1-free, 2-head) speculator shares the batch with default-speculated ones
    assert ids_of(e.generate(p, params, [own, None])) == ref


def test_sampled_speculation_runs_and_is_seeded(llama_dir: Path) -> None:
    spec = engine(llama_dir, heads(64, 3, 0.0, seed=6))
    p = prompts(3, seed=7)
    params = SamplingParams(
        max_new_tokens=20, do_sample=True, temperature=0.7, top_k=20, seed=42, ignore_eos_token=True
    )
    a = ids_of(spec.generate(p, params))
    b = ids_of(spec.generate(p, params))
    assert a == b and all(len(x) == 20 for x in a)
    assert spec.runner.blocks.num_free == spec.runner.blocks.capacity


def test_verification_keeps_the_target_distribution() -> None:
    """The first emitted token must follow p exactly, whatever the (deterministic) draft is."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 1.5
    p = torch.softmax(logits[0], -1)
    params = SamplingParams(do_sample=True, temperature=1.0)
    g = torch.Generator().manual_seed(1)
    n = 3000
    for draft in (int(p.argmax()), int(p.argmin())):
        counts = torch.zeros(6)
        accepted = 0
        for _ in range(n):
            v = verify_drafts(logits, [draft], params, g)
            counts[v.tokens[0]] += 1
            accepted += v.accepted_drafts
        assert torch.allclose(counts / n, p, atol=0.035)
        assert abs(accepted / n - float(p[draft])) < 0.035  # acceptance probability is p(draft)


def test_greedy_verification_accepts_matching_prefix() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 7, 1, 9]):
        logits[row, tok] = 5.0
    v = verify_drafts(logits, [3, 7, 2], SamplingParams(), None)
    assert v.tokens == [3, 7, 1] and v.accepted_drafts == 2
    v = verify_drafts(logits, [3, 7, 1], SamplingParams(), None)
    assert v.tokens == [3, 7, 1, 9] and v.accepted_drafts == 3


def test_draft_accepted_tokens_carry_alternatives_and_are_marked_skipped(llama_dir: Path) -> None:
    """LoRAX marks tokens accepted from drafts `skipped`, and `return_k_alternatives` covers every
    token, drafted or not: the same alternatives as plain decoding of the same greedy tokens."""
    plain = engine(llama_dir)
    spec = engine(llama_dir, heads(64, 4, 0.0, seed=1))
    ps = prompts(6, seed=5)
    params = SamplingParams(max_new_tokens=20, ignore_eos_token=True, top_n_alternatives=3)
    want = plain.generate(ps, params)
    got = spec.generate(ps, params)
    assert ids_of(got) == ids_of(want)
    assert any(t.skipped for r in got for t in r.tokens)  # some drafts were accepted
    assert not any(t.skipped for r in want for t in r.tokens)
    for g, w in zip(got, want):
        for tg, tw in zip(g.tokens, w.tokens):
            assert tg.alternatives is not None and len(tg.alternatives) == 3
            assert [a[0] for a in tg.alternatives] == [a[0] for a in tw.alternatives]
            for (_, _, lg), (_, _, lw) in zip(tg.alternatives, tw.alternatives):
                assert abs(lg - lw) < 1e-4


def test_verification_runs_as_decode_rows_with_the_same_logprobs(
    llama_dir: Path, llama_adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the backend's decode attention reads the cache in place, a verification's tokens are
    laid out as single-token rows, so speculative steps take the one-call decode stack as plain
    steps do; the tokens and every logprob are those of the gathered-context layout. Base rows and
    three adapters' rows share the steps."""
    ps = prompts(12, seed=21)
    ads = [parse_peft_adapter(p) for p in llama_adapters[:3]]
    rows = [ads[i % 4] if i % 4 < 3 else None for i in range(12)]
    params = SamplingParams(max_new_tokens=24, ignore_eos_token=True)
    unrolled = engine(llama_dir, heads(64, 4, 0.0, seed=1))
    if not unrolled.runner.drafts_as_rows or unrolled.runner.model.decode_stack is None:
        pytest.skip("this backend has no in-place decode attention (no native kernels)")
    stack = unrolled.runner.model.decode_stack
    seen: list[tuple[int, bool, bool]] = []  # (rows, has a prefill, ran natively) of every step
    call = type(stack).__call__

    def spy(self, x, h, fb):  # type: ignore[no-untyped-def]
        out = call(self, x, h, fb)
        seen.append((x.shape[0], bool(fb.attn.fresh), out is not None))
        return out

    monkeypatch.setattr(type(stack), "__call__", spy)
    got = unrolled.generate(ps, params, rows)
    assert unrolled.spec_tokens > unrolled.spec_steps > 0  # drafts were verified, some accepted
    assert any(n > len(ps) and ran for n, _, ran in seen)  # more rows than sequences: verifications
    assert all(ran for _, prefill, ran in seen if not prefill)  # every step without a prompt in it

    gathered = engine(llama_dir, heads(64, 4, 0.0, seed=1))
    gathered.runner.drafts_as_rows = False
    want = gathered.generate(ps, params, rows)
    plain = engine(llama_dir).generate(ps, params, rows)  # and the logprobs of decoding one by one
    assert ids_of(got) == ids_of(want) == ids_of(plain)
    for g, w, p in zip(got, want, plain):
        assert [t.skipped for t in g.tokens] == [t.skipped for t in w.tokens]
        for other in (w, p):
            assert max(abs(tg.logprob - to.logprob) for tg, to in zip(g.tokens, other.tokens)) < 1e-4
