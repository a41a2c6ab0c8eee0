"""Turn a step's schedule into the `ForwardBatch` the model consumes.

All per-step metadata (token ids, positions, cache slots, block tables,
attention masks, adapter segments) is built here, once, as a handful of
tensors; the model's layers only read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.engine.sequence import Sequence
from loraserve.layers.attention import AttentionMeta, PagedGroup
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.lora import LoraBatch
from loraserve.layers.rotary import RotaryTable


@dataclass
class StepLayout:
    seqs: list[Sequence]
    spans: list[tuple[int, int]]  # token span of each sequence in the flattened batch
    logit_rows: list[
        list[int]
    ]  # rows whose logits each sequence needs (last token; all when prefill logprobs)


@dataclass
class _PagedRow:
    """A query span that reads the cache: its sequence's block table, how many of its positions
    precede the span, and the span's tokens in the flattened batch."""

    block_table: list[int]
    before: int
    span: tuple[int, int]


def _paged_rows(seq: Sequence, span: tuple[int, int], drafts_as_rows: bool) -> list[_PagedRow]:
    """One row per sequence; or, for a sequence verifying drafts where the backend's decode kernel
    reads single-token rows in place (`drafts_as_rows`), one row per token, each seeing the cache
    up to its own position. Both are the same causal attention (a step writes every new token's
    K/V before any query reads the cache), but the second keeps a speculative step on the
    decode path (the CPU backend's one-call decode stack) where a multi-token row would copy its
    context out of the cache and take the per-layer path. A step verifying 4 drafts, SmolLM2-135M
    shape in fp32, 2 threads, 2-core Zen 4, alternated: 26 vs 29-33 ms at a 200-token context,
    31-33 vs 42-52 ms at 1,500 tokens, 116-120 vs 145-191 ms for 8 sequences at 1,500 tokens (each
    row re-reads the context, from cache after the first); `bench.medusa` on the demo model, whose
    steps are mostly dispatch: 1.35 -> 2.28-2.48 x plain decoding at batch 1 on prose."""
    s, e = span
    if not (drafts_as_rows and seq.drafts and e - s > 1):
        return [_PagedRow(seq.block_table, seq.num_cached, span)]
    return [_PagedRow(seq.block_table, seq.num_cached + j, (s + j, s + j + 1)) for j in range(e - s)]


def block_tables_tensor(tables: list[list[int]], num_tokens: int, block_size: int) -> torch.Tensor:
    """[rows, blocks] int64 on the host: each table's first blocks covering `num_tokens`
    positions, padded with block 0 where a table is shorter (its row never reads that far)."""
    nblk = -(-num_tokens // block_size)
    return torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for t in tables], dtype=torch.long)


def _paged_group(rows: list[_PagedRow], block_size: int, group_size: int, device: torch.device) -> PagedGroup:
    """Every step builds one of these, after the weights of the step before streamed through the
    caches, so each tensor op here runs cold (~10x its hot cost: a batch-1 int8 step's whole
    Python share was ~10 % of it); hence one `torch.tensor` per table and no mask work for
    single-token rows of equal context (batch 1), whose mask is all True."""
    b = len(rows)
    spans = [r.span for r in rows]
    q_lens = [e - s for s, e in spans]
    max_q = max(q_lens)
    ctx = [r.before + q for r, q in zip(rows, q_lens)]  # cached tokens + this step's
    max_ctx = max(ctx)
    tables = block_tables_tensor([r.block_table for r in rows], max_ctx, block_size)
    contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(b - 1))
    dense = contiguous and all(q == max_q for q in q_lens)
    q_rows = pad_rows = None
    if not dense:
        q_rows = torch.tensor([t for s, e in spans for t in range(s, e)], dtype=torch.long, device=device)
        pad_rows = torch.tensor(
            [i * max_q + j for i, (s, e) in enumerate(spans) for j in range(e - s)],
            dtype=torch.long,
            device=device,
        )
    # query j of sequence i sits at position ctx_i - q_i + j and may see cache positions <= it
    ctx_t = torch.tensor(ctx, dtype=torch.long)
    mask: torch.Tensor | None = None
    if max_q == 1:
        qpos = (ctx_t - 1).unsqueeze(1)  # [b, 1]
        if min(ctx) != max_ctx:  # [b, 1, G, max_ctx]: each row's GQA group shares its row's mask
            seen = torch.arange(max_ctx).view(1, max_ctx) < ctx_t.unsqueeze(1)
            mask = seen.view(b, 1, 1, max_ctx).expand(b, 1, group_size, max_ctx)
    else:
        qpos = (ctx_t - torch.tensor(q_lens)).unsqueeze(1) + torch.arange(max_q).unsqueeze(0)  # [b, max_q]
        qpos = torch.minimum(qpos, ctx_t.unsqueeze(1) - 1)  # padded query rows: see the whole context, no NaN
        full = torch.arange(max_ctx).view(1, 1, max_ctx) <= qpos.unsqueeze(2)  # [b, max_q, max_ctx]
        full = full.repeat_interleave(group_size, dim=1).unsqueeze(1)
        # all-True (every query sees its whole context) needs no mask: SDPA is faster without
        mask = None if bool(full.all()) else full
    return PagedGroup(
        num_seqs=b,
        max_q=max_q,
        dense=dense,
        tok_start=spans[0][0],
        q_rows=q_rows,
        pad_rows=pad_rows,
        block_tables=tables.to(device),
        max_ctx=max_ctx,
        ctx_lens=ctx_t.to(device),
        mask=None if mask is None else mask.to(device),
        q_pos=qpos.to(device),
    )


def build_forward_batch(
    decodes: list[Sequence],
    prefills: list[Sequence],
    block_size: int,
    rotary: RotaryTable,
    group_size: int,
    device: torch.device,
    lora_batch: Callable[[list[tuple[int, int, int]]], LoraBatch | None],
    drafts_as_rows: bool = False,
) -> tuple[ForwardBatch, StepLayout]:
    """Decode rows first (one token each, sorted by slot), then prefill rows.

    `lora_batch`: the backend's layout of adapter rows (`Ops.lora_batch`); `drafts_as_rows`: lay
    a verification's tokens out as single-token rows (`_paged_rows`), where the backend's decode
    attention reads the cache (`Ops.decode_reads`)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seqs = decodes + prefills
    spans: list[tuple[int, int]] = []
    logit_rows: list[list[int]] = []
    for seq in seqs:
        start = len(ids)
        # drafts are verified in the same pass; a chunk of a long prompt stops at `prefill_end`
        fed = seq.all_ids[seq.num_cached : seq.prefill_end] + seq.drafts
        for p, tok in enumerate(fed, start=seq.num_cached):
            ids.append(tok)
            positions.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        end = len(ids)
        spans.append((start, end))
        wants_all = seq.drafts or (seq.params.prefill_logprobs and not seq.prefill_reported)
        if seq.prefilling:
            logit_rows.append([])  # a chunk short of the prompt's end: nothing is sampled from it
        else:
            logit_rows.append(list(range(start, end)) if wants_all else [end - 1])
    # ids, positions and slots in one tensor (one cold op instead of three); rows are views
    ids_t, pos_t, slots_t = torch.tensor([ids, positions, slots], dtype=torch.long, device=device).unbind(0)
    attn = AttentionMeta(slot_mapping=slots_t)
    paged: list[_PagedRow] = []
    for seq, span in zip(seqs, spans):
        if seq.num_cached == 0:
            attn.fresh.append(span)
        else:
            paged += _paged_rows(seq, span, drafts_as_rows)
    # decode-only rows and multi-token rows in separate groups so decodes are never padded to a prompt
    singles = [r for r in paged if r.span[1] - r.span[0] == 1]
    multis = [r for r in paged if r.span[1] - r.span[0] > 1]
    for grp in (singles, multis):
        if grp:
            attn.paged.append(_paged_group(grp, block_size, group_size, device))
    token_slots = [(s, e, seq.slot) for seq, (s, e) in zip(seqs, spans) if seq.slot is not None]
    cos, sin = rotary.lookup(pos_t)
    fb = ForwardBatch(
        input_ids=ids_t,
        positions=pos_t,
        cos=cos,
        sin=sin,
        attn=attn,
        lora=lora_batch(token_slots),
    )
    return fb, StepLayout(seqs=seqs, spans=spans, logit_rows=logit_rows)
