"""The native causal attention of fresh prompts (csrc/prefill_attention_cpu.cpp), in both builds,
against PyTorch's SDPA on the same rows, and through `paged_attention` as a model calls it."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from loraserve.layers import attention
from tests.fixtures.native import BUILDS, native_kernel_or_skip


@pytest.fixture(params=BUILDS)
def kernel(request: pytest.FixtureRequest) -> ModuleType:
    return native_kernel_or_skip(request.param)


def _fused(t: int, hq: int, hkv: int, d: int, g: torch.Generator, amp: float = 1.0):
    """q, k, v as a model passes them: head slices of one fused q|k|v output (strided rows)."""
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=g) * amp
    return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


def _reference(q, k, v, spans, scale):
    """Per prompt: KV heads repeated for their query heads, causal SDPA."""
    g = q.shape[1] // k.shape[1]
    out = {}
    for s, e in spans:
        kk = k[s:e].repeat_interleave(g, 1).transpose(0, 1)
        vv = v[s:e].repeat_interleave(g, 1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), kk, vv, is_causal=True, scale=scale)
        out[(s, e)] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize(
    ("lens", "hq", "hkv", "d"),
    [
        ([128], 9, 3, 64),  # SmolLM2's heads, one prompt
        ([1, 5, 37, 130], 9, 3, 64),  # a step of several prompts: a lone token, tails of every tile size
        ([33, 70], 4, 4, 32),  # MHA; D of two AVX-512 vectors (the one-vector weighted sum)
        ([50, 17], 8, 2, 128),  # D = 128
        ([29], 6, 2, 40),  # a head size no register path takes: the portable loops
        ([600], 16, 1, 64),  # 16 query heads on one KV head: fewer positions per work item
    ],
)
def test_prefill_attention_matches_causal_sdpa_per_prompt(
    kernel: ModuleType, lens: list[int], hq: int, hkv: int, d: int
) -> None:
    g = torch.Generator().manual_seed(sum(lens) + d)
    gap = 3  # rows between prompts that are no prompt's: the kernel must leave them alone
    spans, start = [], gap
    for n in lens:
        spans.append((start, start + n))
        start += n + gap
    q, k, v = _fused(start, hq, hkv, d, g)
    out = torch.full((start, hq, d), 7.0)
    kernel.prefill_attention(q, k, v, spans, 0.125, out)
    want = _reference(q, k, v, spans, 0.125)
    covered = torch.zeros(start, dtype=torch.bool)
    for s, e in spans:
        torch.testing.assert_close(out[s:e], want[(s, e)], atol=2e-5, rtol=2e-5)
        covered[s:e] = True
    assert (out[~covered] == 7.0).all()


def test_prefill_attention_keeps_large_scores_stable(kernel: ModuleType) -> None:
    """Scores in the hundreds: each row's max is subtracted before exp, so nothing overflows."""
    g = torch.Generator().manual_seed(3)
    q, k, v = _fused(90, 9, 3, 64, g, amp=6.0)
    out = torch.empty(90, 9, 64)
    kernel.prefill_attention(q, k, v, [(0, 90)], 1.0, out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k, v, [(0, 90)], 1.0)[(0, 90)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
def test_prefill_attention_gives_the_same_rows_on_any_thread_count(kernel: ModuleType, threads: int) -> None:
    """Work items are dealt to threads by cost; every row is still computed exactly once."""
    g = torch.Generator().manual_seed(threads)
    q, k, v = _fused(200, 9, 3, 64, g)
    spans = [(0, 120), (120, 121), (121, 200)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty(200, 9, 64)
        kernel.prefill_attention(q, k, v, spans, 0.2, out)
    finally:
        torch.set_num_threads(old)
    want = _reference(q, k, v, spans, 0.2)
    for s, e in spans:
        torch.testing.assert_close(out[s:e], want[(s, e)], atol=2e-5, rtol=2e-5)


def test_prefill_attention_refuses_bad_operands_with_a_clear_error(kernel: ModuleType) -> None:
    q, k, v = _fused(10, 4, 2, 16, torch.Generator().manual_seed(0))
    out = torch.empty(10, 4, 16)
    with pytest.raises(RuntimeError, match="span out of range"):
        kernel.prefill_attention(q, k, v, [(4, 11)], 1.0, out)
    with pytest.raises(RuntimeError, match="span out of range"):
        kernel.prefill_attention(q, k, v, [(5, 5)], 1.0, out)
    with pytest.raises(RuntimeError, match="shaped like q"):
        kernel.prefill_attention(q, k, v, [(0, 10)], 1.0, torch.empty(10, 4, 8))
    with pytest.raises(RuntimeError, match="contiguous heads"):
        kernel.prefill_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, [(0, 10)], 1.0, out)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        q3, k3, v3 = _fused(10, 3, 2, 16, torch.Generator().manual_seed(0))
        kernel.prefill_attention(q3, k3, v3, [(0, 10)], 1.0, torch.empty(10, 3, 16))


def test_paged_attention_takes_the_kernel_for_fresh_prompts_beside_decode_rows(kernel: ModuleType) -> None:
    """One step as the engine builds it: two decode rows reading the cache, then two fresh prompts;
    the prompts' rows go through the kernel, the decode rows through the decode kernel, and the
    whole output equals the PyTorch path's."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, bs, blocks = 9, 3, 64, 4, 32
    k_cache = torch.zeros(blocks, bs, hkv, d)
    v_cache = torch.zeros(blocks, bs, hkv, d)
    # two sequences with 6 and 9 cached positions, decoding their next token
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    ctx = [7, 10]
    for b, n in enumerate(ctx):
        flat = tables[b].repeat_interleave(bs) * bs + torch.arange(bs).repeat(len(tables[b]))
        k_cache.view(-1, hkv, d)[flat[: n - 1]] = torch.randn(n - 1, hkv, d, generator=g)
        v_cache.view(-1, hkv, d)[flat[: n - 1]] = torch.randn(n - 1, hkv, d, generator=g)
    lens = [12, 5]
    t = 2 + sum(lens)
    q, k, v = _fused(t, hq, hkv, d, g)
    decode_slots = [tables[b, (n - 1) // bs].item() * bs + (n - 1) % bs for b, n in enumerate(ctx)]
    prompt_slots = list(range(8 * bs, 8 * bs + sum(lens)))
    meta = attention.AttentionMeta(
        slot_mapping=torch.tensor(decode_slots + prompt_slots),
        fresh=[(2, 14), (14, 19)],
        paged=[
            attention.PagedGroup(
                num_seqs=2,
                max_q=1,
                dense=True,
                tok_start=0,
                q_rows=None,
                pad_rows=None,
                block_tables=tables,
                max_ctx=max(ctx),
                ctx_lens=torch.tensor(ctx),
                mask=None,
            )
        ],
    )
    got = attention.paged_attention(
        q,
        k,
        v,
        k_cache.clone(),
        v_cache.clone(),
        meta,
        0.125,
        decode=kernel.paged_decode_attention,
        write=kernel.write_kv,
        prefill=kernel.prefill_attention,
    )
    # the PyTorch path (the decode rows need their mask there: the contexts differ)
    mask = torch.arange(max(ctx)).view(1, 1, 1, -1) < torch.tensor(ctx).view(-1, 1, 1, 1)
    meta.paged[0].mask = mask
    want = attention.paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
