"""Pick the next token for every sequence of a batch in one pass.

Order and arithmetic follow Hugging Face `generate`: the logits pipeline
(engine/logits_pipeline.py: repetition penalty, watermark, then for sampling
rows temperature, top-k, top-p and typical-p), then a draw; greedy rows take the
argmax of the penalized logits.

Reproducibility: each sampling row draws exactly ONE uniform number from its own
generator and inverts the CDF of its own (warped) distribution. The token thus
depends only on the row's logits, parameters and generator state, never on which
other requests share the batch or on how many rows there are, so a seeded request
gives the same text alone or under load.

Reported logprob: log_softmax of the logits after repetition penalty and
temperature but *before* top-k/top-p/typical truncation. Truncation renormalizes
over the kept tokens, which would make the number depend on the truncation knobs
(top_k=1 would always report 0.0) and give -inf to every alternative outside the
kept set; the pre-truncation value is the model's (temperature-scaled) belief,
comparable across requests and meaningful for alternatives. Greedy rows ignore
temperature, as HF greedy decoding does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.engine import logits_pipeline
from loraserve.engine.logits_pipeline import SamplingRow, is_sampling
from loraserve.layers.ops import TorchOps

__all__ = ["SampleOutput", "SamplingRow", "draw", "is_sampling", "make_generator", "sample"]

_SEED_MASK = (1 << 64) - 1


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64, cpu
    logprobs: torch.Tensor  # [B] float32, cpu
    alternatives: list[list[tuple[int, float]]] | None  # per row, best first; None when no row asked


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-request generator; seeds beyond 64 bits wrap (LoRAX seeds are u64)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) & _SEED_MASK)
    return g


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per row: first argmax, logsumexp, all finite
RowStats = Callable[[torch.Tensor], Stats]


def known_stats(logits: torch.Tensor, known: Stats, compute: RowStats) -> RowStats:
    """`known` (a pass already made over `logits`) for scores no logits processor changed, which
    are `logits` itself; `compute` (the backend's pass) for any other scores."""
    return lambda scores: known if scores is logits else compute(scores)


Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scores [B, V], uniforms [B]) -> tokens [B]


def sample(
    logits: torch.Tensor, rows: list[SamplingRow], stats: RowStats | None = None, pick: Pick | None = None
) -> SampleOutput:
    """Choose one token per row of `logits` [B, V]; computed in float32 whatever the input dtype.

    `stats` is the backend's `Ops.argmax_logsumexp` (per row: first argmax, logsumexp): a greedy
    token and every logprob come from it, log p(t) = score(t) - lse, with no [B, V] log_softmax
    (on CPU its native kernel is one pass where torch's argmax alone cost more than attention).
    `pick` is the backend's `Ops.draw` (the token at each row's uniform): the CPU backend's native
    one is what its decode bursts draw with, so a sampled row's tokens are the same either way."""
    b, _ = logits.shape
    if b != len(rows):
        raise ValueError(f"{b} logit rows but {len(rows)} sampling rows")
    scaled = logits_pipeline.scores(logits, rows)
    samplers = [i for i, r in enumerate(rows) if is_sampling(r.params)]
    tokens, lse, _ = (stats or TorchOps.argmax_logsumexp)(scaled)
    if samplers:
        tokens = _sample_rows(scaled, rows, samplers, tokens, pick)

    chosen = scaled.gather(1, tokens[:, None]).squeeze(1) - lse
    n_alt = [max(r.params.top_n_alternatives, 0) for r in rows]
    n_max = min(max(n_alt), scaled.shape[-1])
    if n_max == 0 and scaled.device.type == "cpu":
        # already host tensors: the one-copy packing below is for accelerators, and each of its
        # six small ops costs microseconds on CPU, cold after a decode step's weight stream
        return SampleOutput(token_ids=tokens.long(), logprobs=chosen, alternatives=None)
    parts = [tokens.double(), chosen.double()]
    if n_max > 0:
        top = torch.topk(scaled, n_max, dim=-1)
        parts += [top.indices.double().reshape(-1), (top.values - lse[:, None]).double().reshape(-1)]
    # One device->host copy (one sync) for everything the engine reads.
    host = torch.cat(parts).cpu()
    token_ids = host[:b].long()
    logprobs = host[b : 2 * b].float()
    alternatives = None
    if n_max > 0:
        alt_ids = host[2 * b : 2 * b + b * n_max].long().view(b, n_max).tolist()
        alt_lps = host[2 * b + b * n_max :].float().view(b, n_max).tolist()
        alternatives = [list(zip(alt_ids[i][:n], alt_lps[i][:n], strict=True)) for i, n in enumerate(n_alt)]
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, alternatives=alternatives)


def _sample_rows(
    scaled: torch.Tensor,
    rows: list[SamplingRow],
    samplers: list[int],
    tokens: torch.Tensor,
    pick: Pick | None,
) -> torch.Tensor:
    b = scaled.shape[0]
    idx = torch.tensor(samplers, device=scaled.device) if len(samplers) < b else None
    sub = scaled if idx is None else scaled[idx]
    sub = logits_pipeline.truncate(sub, [rows[i] for i in samplers])
    drawn = draw(sub, [rows[i].generator for i in samplers], pick)
    if idx is None:
        return drawn
    tokens = tokens.clone()
    tokens[idx] = drawn
    return tokens


def draw(
    scores: torch.Tensor, generators: list[torch.Generator | None], pick: Pick | None = None
) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row from that row's generator, the token picked
    by `pick` (a backend's `Ops.draw`; by default PyTorch's)."""
    u = torch.stack([torch.rand((), generator=g, device=scores.device) for g in generators])
    return (pick or TorchOps.draw)(scores, u)
