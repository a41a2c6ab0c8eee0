"""LoRAX/TGI's `watermark` parameter: Kirchenbauer et al.'s green-list bias.

Before sampling, a pseudo-random half (`gamma`) of the vocabulary, chosen by a
generator seeded with `hash_key * previous_token`, gets `delta` added to its
logits. Text generated this way over-uses "green" tokens, which a detector
that knows `hash_key` can test for; the constants and seeding are TGI's
(`WatermarkLogitsProcessor`), so LoRAX's detectors work on our output.
"""

from __future__ import annotations

import torch

GAMMA = 0.5
DELTA = 2.0
HASH_KEY = 15485863


def greenlist(prev_token: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(HASH_KEY * prev_token)
    return torch.randperm(vocab, device=device, generator=g)[: int(vocab * GAMMA)]


def apply_watermark(logits: torch.Tensor, rows: list[int], prev_tokens: list[int]) -> torch.Tensor:
    """Bias the green lists of `rows` (indices into logits [B, V]) given each row's previous token."""
    out = logits.clone()
    for row, prev in zip(rows, prev_tokens):
        out[row, greenlist(prev, logits.shape[-1], logits.device)] += DELTA
    return out
