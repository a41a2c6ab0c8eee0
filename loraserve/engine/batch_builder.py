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
    """Every step builds one of these, after the weights of the step before streamed through the
    caches, so each tensor op here runs cold (~10x its hot cost: a batch-1 int8 step's whole
    Python share was ~10 % of it); hence one `torch.tensor` per table and no mask work for
    single-token rows of equal context (batch 1), whose mask is all True."""
    b = len(seqs)
    q_lens = [e - s for s, e in spans]
    max_q = max(q_lens)
    ctx = [seq.num_cached + q for seq, q in zip(seqs, q_lens)]  # cached tokens + this step's
    max_ctx = max(ctx)
    nblk = -(-max_ctx // block_size)
    tables = torch.tensor(
        [seq.block_table[:nblk] + [0] * (nblk - len(seq.block_table[:nblk])) for seq in seqs],
        dtype=torch.long,
    )
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
    # ids, positions and slots in one tensor (one cold op instead of three); rows are views
    ids_t, pos_t, slots_t = torch.tensor([ids, positions, slots], dtype=torch.long, device=device).unbind(0)
    attn = AttentionMeta(slot_mapping=slots_t)
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
