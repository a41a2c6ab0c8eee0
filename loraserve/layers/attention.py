"""Attention over a paged KV cache.

The cache of one layer is a preallocated tensor ``[num_blocks, block_size,
kv_heads, head_dim]``; a sequence owns a list of blocks (its block table), so
the batch can change every step without copying anyone's cache.

Two kinds of work share one step:
- *fresh prefills* (no earlier context) attend only to their own new tokens,
  so they use causal SDPA on views of the new K/V, with no gather and no mask;
- everything else (decode, recompute after preemption with context, draft
  verification) gathers its context from the cache through the block tables,
  padded to the longest context in its group, with a boolean mask; except
  single-token rows on CPU with the native kernels (`layers/native_cpu.py`),
  which read their context in place, block by block, without the copy.

Grouped-query attention is handled without repeating K/V: the query heads
that share a KV head are folded into the query-length axis, so SDPA sees plain
multi-head attention with `kv_heads` heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F


@dataclass
class PagedGroup:
    """Sequences that read their context from the cache (built once per step)."""

    num_seqs: int
    max_q: int
    dense: bool  # tokens are contiguous and every sequence has exactly max_q of them
    tok_start: int  # first token of the group when dense
    q_rows: torch.Tensor | None  # [N] token indices (not dense)
    pad_rows: torch.Tensor | None  # [N] positions in the padded [num_seqs * max_q] layout
    block_tables: torch.Tensor  # [num_seqs, blocks_per_seq]
    max_ctx: int
    ctx_lens: torch.Tensor  # [num_seqs] int64 context length of each sequence
    mask: torch.Tensor | None  # [num_seqs, 1, max_q * group_size, max_ctx] bool, True = attend; None: all


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    fresh: list[tuple[int, int]] = field(default_factory=list)  # (tok_start, tok_end) causal prefills
    paged: list[PagedGroup] = field(default_factory=list)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v)


def _fold_gqa(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Lq, Hq, D] -> [B, Hkv, Lq*G, D]: query heads of one KV head become extra query rows."""
    b, lq, hq, d = q.shape
    g = hq // kv_heads
    return q.view(b, lq, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, lq * g, d)


def _unfold_gqa(o: torch.Tensor, lq: int) -> torch.Tensor:
    """Inverse of `_fold_gqa`: [B, Hkv, Lq*G, D] -> [B, Lq, Hq, D]."""
    b, hkv, rows, d = o.shape
    g = rows // lq
    return o.view(b, hkv, lq, g, d).permute(0, 2, 1, 3, 4).reshape(b, lq, hkv * g, d)


def _all_single_decodes(grp: PagedGroup, num_tokens: int) -> bool:
    return grp.dense and grp.max_q == 1 and grp.tok_start == 0 and grp.num_seqs == num_tokens


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, grp: PagedGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, max_ctx, D] views of each sequence's K and V, copied out of its blocks."""
    b, nb = grp.block_tables.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    # index_select copies whole contiguous blocks (much faster than advanced indexing on CPU)
    flat = grp.block_tables.view(-1)
    kg = k_cache.index_select(0, flat).view(b, nb * bs, hkv, -1)[:, : grp.max_ctx].transpose(1, 2)
    vg = v_cache.index_select(0, flat).view(b, nb * bs, hkv, -1)[:, : grp.max_ctx].transpose(1, 2)
    return kg, vg


def _native_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    grp: PagedGroup,
    scale: float,
    kernels: ModuleType,
) -> torch.Tensor:
    """[num_seqs, Hq, D] for a group of single-token rows, read straight from the cache blocks
    by the native CPU kernel (no gathered copy, whose cost grows with the context)."""
    rows = q[grp.tok_start : grp.tok_start + grp.num_seqs] if grp.dense else q.index_select(0, grp.q_rows)
    return kernels.paged_decode_attention(rows, k_cache, v_cache, grp.block_tables, grp.ctx_lens, scale)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    grp: PagedGroup,
    scale: float,
    kernels: ModuleType | None,
) -> torch.Tensor:
    """The common step: every token is one sequence's next token. Without the native kernel,
    one query per sequence makes folding GQA heads a plain view and the output needs no
    scatter: 5 fewer ops per layer than the general path."""
    if kernels is not None:
        return _native_decode(q, k_cache, v_cache, grp, scale, kernels)
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    kg, vg = _gather_context(k_cache, v_cache, grp)
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), kg, vg, attn_mask=grp.mask, scale=scale)
    return o.reshape(b, hq, d)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    kernels: ModuleType | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D].

    `kernels`: the native CPU kernels; single-token rows then read the cache in place."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    hkv = k.shape[1]
    if not meta.fresh and len(meta.paged) == 1 and _all_single_decodes(meta.paged[0], q.shape[0]):
        return _decode_attention(q, k_cache, v_cache, meta.paged[0], scale, kernels)
    out = torch.empty_like(q)
    for s, e in meta.fresh:
        qs = _fold_gqa(q[s:e].unsqueeze(0), hkv)
        g = q.shape[1] // hkv
        ks = k[s:e].unsqueeze(0).transpose(1, 2)
        vs = v[s:e].unsqueeze(0).transpose(1, 2)
        if g == 1:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            # folded rows are (position, head-in-group); causal must compare positions only
            n = e - s
            pos = torch.arange(n, device=q.device).repeat_interleave(g)
            mask = pos.unsqueeze(1) >= torch.arange(n, device=q.device).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[s:e] = _unfold_gqa(o, e - s)[0]
    for grp in meta.paged:
        b, lq = grp.num_seqs, grp.max_q
        if lq == 1 and kernels is not None:  # decode rows beside prefills
            o = _native_decode(q, k_cache, v_cache, grp, scale, kernels)
            if grp.dense:
                out[grp.tok_start : grp.tok_start + b] = o
            else:
                out.index_copy_(0, grp.q_rows, o)
            continue
        if grp.dense:
            qg = q[grp.tok_start : grp.tok_start + b * lq].view(b, lq, *q.shape[1:])
        else:
            qg = q.new_zeros(b * lq, *q.shape[1:])
            qg.index_copy_(0, grp.pad_rows, q.index_select(0, grp.q_rows))
            qg = qg.view(b, lq, *q.shape[1:])
        kg, vg = _gather_context(k_cache, v_cache, grp)
        o = F.scaled_dot_product_attention(_fold_gqa(qg, hkv), kg, vg, attn_mask=grp.mask, scale=scale)
        o = _unfold_gqa(o, lq).reshape(b * lq, *q.shape[1:])
        if grp.dense:
            out[grp.tok_start : grp.tok_start + b * lq] = o
        else:
            out.index_copy_(0, grp.q_rows, o.index_select(0, grp.pad_rows))
    return out
