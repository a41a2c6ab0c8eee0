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


def _paged_group(
    seqs: list[Sequence], spans: list[tuple[int, int]], block_size: int, group_size: int, device: torch.device
) -> PagedGroup:
    b = len(seqs)
    q_lens = [e - s for s, e in spans]
    max_q = max(q_lens)
    ctx = [seq.num_cached + q for seq, q in zip(seqs, q_lens)]  # cached tokens + this step's
    max_ctx = max(ctx)
    nblk = -(-max_ctx // block_size)
    tables = torch.zeros(b, nblk, dtype=torch.long)
    for i, seq in enumerate(seqs):
        tables[i, : len(seq.block_table[:nblk])] = torch.tensor(seq.block_table[:nblk], dtype=torch.long)
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
    qpos = (ctx_t - torch.tensor(q_lens)).unsqueeze(1) + torch.arange(max_q).unsqueeze(0)  # [b, max_q]
    qpos = torch.minimum(qpos, ctx_t.unsqueeze(1) - 1)  # padded query rows: see the whole context, no NaN
    mask = torch.arange(max_ctx).view(1, 1, max_ctx) <= qpos.unsqueeze(2)  # [b, max_q, max_ctx]
    mask = mask.repeat_interleave(group_size, dim=1).unsqueeze(1)
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
        # all-True (single-token decodes of equal context) needs no mask: SDPA is faster without
        mask=None if bool(mask.all()) else mask.to(device),
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
) -> tuple[ForwardBatch, StepLayout]:
    """Decode rows first (one token each, sorted by slot), then prefill rows.

    `lora_batch`: the backend's layout of adapter rows (`Ops.lora_batch`)."""
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
    attn = AttentionMeta(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
    paged_seqs, paged_spans = [], []
    for seq, span in zip(seqs, spans):
        if seq.num_cached == 0:
            attn.fresh.append(span)
        else:
            paged_seqs.append(seq)
            paged_spans.append(span)
    if paged_seqs:
        # decode-only rows and multi-token rows in separate groups so decodes are never padded to a prompt
        singles = [(s, sp) for s, sp in zip(paged_seqs, paged_spans) if sp[1] - sp[0] == 1]
        multis = [(s, sp) for s, sp in zip(paged_seqs, paged_spans) if sp[1] - sp[0] > 1]
        for grp in (singles, multis):
            if grp:
                attn.paged.append(
                    _paged_group([g[0] for g in grp], [g[1] for g in grp], block_size, group_size, device)
                )
    token_slots = [(s, e, seq.slot) for seq, (s, e) in zip(seqs, spans) if seq.slot is not None]
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    cos, sin = rotary.lookup(pos_t)
    fb = ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=pos_t,
        cos=cos,
        sin=sin,
        attn=attn,
        lora=lora_batch(token_slots),
    )
    return fb, StepLayout(seqs=seqs, spans=spans, logit_rows=logit_rows)
