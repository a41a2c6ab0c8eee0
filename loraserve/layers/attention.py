"""Attention over a paged KV cache.

The cache of one layer is a preallocated tensor ``[num_blocks, block_size,
kv_heads, head_dim]``; a sequence owns a list of blocks (its block table), so
the batch can change every step without copying anyone's cache.

Two kinds of work share one step:
- *fresh prefills* (no earlier context) attend only to their own new tokens,
  so they use causal SDPA on views of the new K/V, with no gather; or, when the
  backend passes a `prefill` kernel (the native CPU one), all of a step's fresh
  prompts in one call that computes no score past the diagonal;
- everything else (decode, recompute after preemption with context, draft
  verification) gathers its context from the cache through the block tables,
  padded to the longest context in its group, with a boolean mask; except
  single-token rows when the backend passes a `decode` kernel (the native CPU
  one, layers/ops_cpu.py), which reads their context in place, block by
  block, without the copy.

Sliding-window layers (Mistral, Gemma 2) mask keys more than `window - 1`
positions behind their query; logit soft-capping (Gemma 2) squashes scores
with `cap * tanh(s / cap)` before the softmax, which SDPA cannot do, so
those calls compute scores explicitly.

Grouped-query attention is handled without repeating K/V: the query heads
that share a KV head are folded into the query-length axis, so SDPA sees plain
multi-head attention with `kv_heads` heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    q_pos: torch.Tensor | None = None  # [num_seqs, max_q] position of each (padded) query row


# (queries [N, Hq, D], k_cache, v_cache, block_tables, ctx_lens, scale) -> [N, Hq, D]
DecodeKernel = Callable[..., torch.Tensor]
KVWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (q [T, Hq, D], k, v [T, Hkv, D], spans [(start, end)], scale, out [T, Hq, D]) -> None: fills the spans' rows
PrefillKernel = Callable[..., None]


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    fresh: list[tuple[int, int]] = field(default_factory=list)  # (tok_start, tok_end) causal prefills
    paged: list[PagedGroup] = field(default_factory=list)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """New keys and values into their slots, rounded to the cache's dtype (`--kv-cache-dtype`)."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


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


def all_single_decodes(grp: PagedGroup, num_tokens: int) -> bool:
    return grp.dense and grp.max_q == 1 and grp.tok_start == 0 and grp.num_seqs == num_tokens


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, grp: PagedGroup, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, max_ctx, D] views of each sequence's K and V, copied out of its blocks, in the
    queries' `dtype` (a 16-bit cache under fp32 activations is widened here)."""
    b, nb = grp.block_tables.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    # index_select copies whole contiguous blocks (much faster than advanced indexing on CPU)
    flat = grp.block_tables.view(-1)
    kg = k_cache.index_select(0, flat).view(b, nb * bs, hkv, -1)[:, : grp.max_ctx].transpose(1, 2)
    vg = v_cache.index_select(0, flat).view(b, nb * bs, hkv, -1)[:, : grp.max_ctx].transpose(1, 2)
    return kg.to(dtype), vg.to(dtype)


def _kernel_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    grp: PagedGroup,
    scale: float,
    decode: DecodeKernel,
) -> torch.Tensor:
    """[num_seqs, Hq, D] for a group of single-token rows, read straight from the cache blocks
    by a backend's kernel (no gathered copy, whose cost grows with the context)."""
    rows = q[grp.tok_start : grp.tok_start + grp.num_seqs] if grp.dense else q.index_select(0, grp.q_rows)
    return decode(rows, k_cache, v_cache, grp.block_tables, grp.ctx_lens, scale)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """SDPA, or the same math with scores soft-capped (which SDPA cannot do)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _window_mask(grp: PagedGroup, group_size: int, window: int) -> torch.Tensor:
    """The group's mask, also hiding keys `window` or more positions behind each query."""
    kpos = torch.arange(grp.max_ctx, device=grp.block_tables.device)
    inside = kpos.view(1, 1, -1) > (grp.q_pos.unsqueeze(2) - window)  # [b, max_q, max_ctx]
    inside = inside.repeat_interleave(group_size, dim=1).unsqueeze(1)
    return inside if grp.mask is None else grp.mask & inside


def _fresh_mask(n: int, g: int, device: torch.device, window: int | None) -> torch.Tensor:
    """Causal (and windowed) mask of a fresh prefill whose GQA heads are folded into rows
    (position, head-in-group): it compares positions only."""
    pos = torch.arange(n, device=device).repeat_interleave(g).unsqueeze(1)
    keys = torch.arange(n, device=device).unsqueeze(0)
    mask = pos >= keys
    if window is not None:
        mask &= keys > pos - window
    return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    decode: DecodeKernel | None = None,
    write: KVWriter = write_kv,
    prefill: PrefillKernel | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated). Returns [T, Hq, D].

    `window`: sliding-window size (keys at most window - 1 positions back); `softcap`:
    attention-logit soft-capping; `decode`: a kernel for single-token rows (only passed when
    neither of the two is set); `write`: a backend's `write_kv`; `prefill`: a kernel for the fresh
    prefills (likewise only without window or soft-capping)."""
    write(k_cache, v_cache, k, v, meta.slot_mapping)
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    plain = window is None and softcap is None
    if plain and not meta.fresh and len(meta.paged) == 1 and all_single_decodes(meta.paged[0], q.shape[0]):
        grp = meta.paged[0]
        if decode is not None:
            return _kernel_decode(q, k_cache, v_cache, grp, scale, decode)
        # one query per sequence: folding GQA heads is a plain view and the output needs no scatter
        b, hq, d = q.shape
        kg, vg = _gather_context(k_cache, v_cache, grp, q.dtype)
        o = F.scaled_dot_product_attention(q.view(b, hkv, g, d), kg, vg, attn_mask=grp.mask, scale=scale)
        return o.reshape(b, hq, d)
    out = torch.empty_like(q)
    fresh = meta.fresh
    if fresh and prefill is not None and plain:
        prefill(q, k, v, fresh, scale, out)
        fresh = []
    for s, e in fresh:
        qs = _fold_gqa(q[s:e].unsqueeze(0), hkv)
        ks = k[s:e].unsqueeze(0).transpose(1, 2)
        vs = v[s:e].unsqueeze(0).transpose(1, 2)
        if g == 1 and plain:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            o = _attend(qs, ks, vs, _fresh_mask(e - s, g, q.device, window), scale, softcap)
        out[s:e] = _unfold_gqa(o, e - s)[0]
    for grp in meta.paged:
        b, lq = grp.num_seqs, grp.max_q
        if lq == 1 and decode is not None and plain:  # decode rows beside prefills
            o = _kernel_decode(q, k_cache, v_cache, grp, scale, decode)
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
        kg, vg = _gather_context(k_cache, v_cache, grp, q.dtype)
        mask = grp.mask if window is None else _window_mask(grp, g, window)
        o = _attend(_fold_gqa(qg, hkv), kg, vg, mask, scale, softcap)
        o = _unfold_gqa(o, lq).reshape(b * lq, *q.shape[1:])
        if grp.dense:
            out[grp.tok_start : grp.tok_start + b * lq] = o
        else:
            out.index_copy_(0, grp.q_rows, o.index_select(0, grp.pad_rows))
    return out
