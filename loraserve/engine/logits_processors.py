"""Batched logits processors with per-row parameters.

Each function is the batched equivalent of one Hugging Face processor (same
arithmetic, same tie and boundary rules) so HF can serve as the test oracle, but
every row may carry its own value, with a neutral value meaning "off" for that row.
Per-row parameters arrive as Python lists (they come from request objects), so
no device->host sync is ever needed to decide what to run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(
    scores: torch.Tensor, penalties: Sequence[float], histories: Sequence[torch.Tensor]
) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor`, one penalty and token history per row.

    Works on the flattened (row, id) positions of all histories at once, so the cost
    is one copy of the logits plus O(total history), with no per-row loop. A repeated
    id writes the same value several times, which is harmless. Ids >= V (embedding
    rows past the lm_head) are ignored, as HF does.
    """
    b, v = scores.shape
    device = scores.device
    lengths = torch.tensor([h.numel() for h in histories], device=device)
    row_ids = torch.repeat_interleave(torch.arange(b, device=device), lengths)
    cols = torch.cat([h.reshape(-1).to(device=device, dtype=torch.long) for h in histories])
    # Out-of-range ids land in one spare column that is dropped afterwards (no boolean
    # masking, which would need a data-dependent nonzero()).
    flat = row_ids * (v + 1) + cols.clamp(max=v)
    p = torch.repeat_interleave(torch.tensor(penalties, dtype=scores.dtype, device=device), lengths)
    out = torch.nn.functional.pad(scores, (0, 1))
    vals = out.view(-1)[flat]
    out.view(-1)[flat] = torch.where(vals < 0, vals * p, vals / p)
    return out[:, :v]


def apply_temperature(scores: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """HF `TemperatureLogitsWarper`; rows with 1.0 are left bit-identical."""
    if all(t == 1.0 for t in temperatures):
        return scores
    t = torch.tensor(temperatures, dtype=scores.dtype, device=scores.device)[:, None]
    return scores / t


def apply_top_k(scores: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """HF `TopKLogitsWarper` (ties with the k-th value survive); 0 disables a row.

    One `topk` with the batch's largest k serves every row: each row reads its own
    threshold at column k-1, which avoids sorting the full vocabulary.
    """
    v = scores.shape[-1]
    ks = [min(max(k, 1), v) if k > 0 else 0 for k in top_k]
    kmax = max(ks, default=0)
    if kmax == 0 or all(k in (0, v) for k in ks):
        return scores
    values = torch.topk(scores, kmax, dim=-1).values
    col = torch.tensor([max(k - 1, 0) for k in ks], device=scores.device)[:, None]
    kth = values.gather(1, col)
    disabled = torch.tensor([k == 0 for k in ks], device=scores.device)[:, None]
    kth = kth.masked_fill(disabled, NEG_INF)
    return scores.masked_fill(scores < kth, NEG_INF)


def _on_rows(
    scores: torch.Tensor, enabled: list[bool], fn: Callable[[torch.Tensor, list[int]], torch.Tensor]
) -> torch.Tensor:
    """Run a full-vocab-sort warper only on the rows that asked for it."""
    rows = [i for i, e in enumerate(enabled) if e]
    if not rows:
        return scores
    if len(rows) == scores.shape[0]:
        return fn(scores, rows)
    idx = torch.tensor(rows, device=scores.device)
    out = scores.clone()
    out[idx] = fn(scores[idx], rows)
    return out


def apply_top_p(scores: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """HF `TopPLogitsWarper` (keeps at least one token); 1.0 disables a row."""

    def warp(s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        # Threshold computed in Python double then cast, exactly as HF compares with `1 - top_p`.
        thr = torch.tensor([1 - float(top_p[i]) for i in rows], dtype=s.dtype, device=s.device)[:, None]
        sorted_logits, sorted_idx = torch.sort(s, descending=False, stable=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= thr
        remove[..., -1:] = False
        return s.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)

    return _on_rows(scores, [p < 1.0 for p in top_p], warp)


def apply_typical_p(scores: torch.Tensor, typical_p: Sequence[float]) -> torch.Tensor:
    """HF `TypicalLogitsWarper` (locally typical sampling); 1.0 disables a row."""

    def warp(s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        mass = torch.tensor([float(typical_p[i]) for i in rows], dtype=s.dtype, device=s.device)[:, None]
        normalized = torch.log_softmax(s, dim=-1)
        p = torch.exp(normalized)
        ent = -(normalized * p).nansum(-1, keepdim=True)
        shifted = torch.abs((-normalized) - ent)
        sorted_scores, sorted_idx = torch.sort(shifted, descending=False, stable=True)
        cum = s.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
        last_ind = (cum < mass).sum(dim=1).clamp_(max=sorted_scores.shape[-1] - 1)
        remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
        remove[..., :1] = False
        return s.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)

    return _on_rows(scores, [p < 1.0 for p in typical_p], warp)


def apply_frequency_presence(
    scores: torch.Tensor,
    frequency: Sequence[float],
    presence: Sequence[float],
    outputs: Sequence[torch.Tensor],
) -> torch.Tensor:
    """OpenAI's penalties: ``logit[t] -= frequency * count(t) + presence * (count(t) > 0)`` over the
    tokens generated so far (not the prompt), one pair of values and one output per row."""
    b, v = scores.shape
    counts = torch.zeros(b, v + 1, dtype=scores.dtype, device=scores.device)
    for i, out in enumerate(outputs):  # ids >= V (embedding rows past the lm_head) land in column V
        ids = out.reshape(-1).to(device=scores.device, dtype=torch.long).clamp(max=v)
        counts[i].index_add_(0, ids, torch.ones(ids.numel(), dtype=scores.dtype, device=scores.device))
    counts = counts[:, :v]
    f = torch.tensor(frequency, dtype=scores.dtype, device=scores.device)[:, None]
    p = torch.tensor(presence, dtype=scores.dtype, device=scores.device)[:, None]
    return scores - f * counts - p * (counts > 0).to(scores.dtype)
