"""Verify Medusa drafts against the target model: lossless speculative decoding.

A sequence with drafts d_1..d_K feeds [last, d_1, ..., d_K] through the model
in one pass; row i's logits give the target distribution p_i for the token
after position i. Medusa drafts are deterministic (argmax of the heads), i.e.
a one-hot draft distribution q, so standard speculative sampling reduces to:
accept d_i with probability p_i(d_i); on rejection draw from p_i with d_i
removed (the normalised residual max(p - q, 0)); if every draft is accepted,
draw a bonus token from p_{K+1}. The emitted tokens are then distributed
exactly as if drawn one by one from the target model. For greedy rows this is
"accept while d_i == argmax p_i", so the output is identical to plain greedy
decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine import logits_pipeline
from loraserve.engine.logits_pipeline import SamplingRow, is_sampling
from loraserve.engine.params import SamplingParams
from loraserve.engine.sampling import RowStats, draw
from loraserve.layers.ops import TorchOps


@dataclass
class Verified:
    tokens: list[int]  # accepted drafts followed by one corrected/bonus token
    logprobs: list[float]
    accepted_drafts: int
    alternatives: list[list[tuple[int, float]]] | None = None  # top-n per emitted token, when asked


def _alternatives(scaled: torch.Tensor, n: int) -> list[list[tuple[int, float]]] | None:
    """Top-`n` (id, logprob) of each row, best first, from the same scores plain sampling reports
    them from (after penalties and temperature, before truncation)."""
    if n <= 0:
        return None
    top = torch.topk(torch.log_softmax(scaled, dim=-1), min(n, scaled.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist())]


def verify_drafts(
    logits: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    grammar_masks: torch.Tensor | None = None,
    stats: RowStats | None = None,
) -> Verified:
    """logits: [K+1, V] (float32) for [last, d_1..d_K]; returns the tokens to emit this step.
    `grammar_masks`: a structured-output row's bitmask at each position (grammar.draft_masks);
    `stats`: as `sampling.sample`'s, the backend's one pass for each row's first argmax and
    logsumexp (greedy rows' targets and logprobs come from it)."""
    k = len(drafts)
    if grammar_masks is not None:
        rows = [SamplingRow(params, generator, None, grammar=grammar_masks[i]) for i in range(k + 1)]
    else:
        rows = [SamplingRow(params, generator, None)] * (k + 1)
    if not is_sampling(params):
        logits = logits_pipeline.scores(logits, rows)
        arg, lse, _ = (stats or TorchOps.argmax_logsumexp)(logits)
        target = arg.tolist()
        m = 0
        while m < k and drafts[m] == target[m]:
            m += 1
        # logprob of the argmax = its logit minus the row's logsumexp (no full log_softmax tensor)
        kept = logits[: m + 1]
        chosen = kept.gather(1, arg[: m + 1].long().unsqueeze(1)).squeeze(1) - lse[: m + 1]
        alts = _alternatives(kept, params.top_n_alternatives)
        return Verified(target[: m + 1], chosen.tolist(), m, alts)
    scaled = logits_pipeline.scores(logits, rows)
    warped = logits_pipeline.truncate(scaled, rows)
    probs = torch.softmax(warped, dim=-1)
    d = torch.tensor(drafts, device=logits.device)
    p_draft = probs[torch.arange(k, device=logits.device), d] if k else probs.new_zeros(0)
    u = torch.rand(k, generator=generator, device=logits.device) if k else p_draft
    accept = (u < p_draft).tolist()
    m = 0
    while m < k and accept[m]:
        m += 1
    if m < k:  # residual distribution: the target with the rejected draft removed
        residual = warped[m].clone()
        residual[drafts[m]] = float("-inf")
        if torch.isinf(residual).all():  # p put all its mass on the draft: acceptance was certain
            residual = warped[m]
        last = int(draw(residual.unsqueeze(0), [generator])[0])
    else:
        last = int(draw(warped[k].unsqueeze(0), [generator])[0])
    toks = drafts[:m] + [last]
    lp = torch.log_softmax(scaled[: m + 1], dim=-1)
    alts = _alternatives(scaled[: m + 1], params.top_n_alternatives)
    return Verified(toks, lp[torch.arange(m + 1), torch.tensor(toks)].tolist(), m, alts)
