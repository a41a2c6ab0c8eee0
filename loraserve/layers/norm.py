"""RMSNorm computed in float32, as HF Llama does, so low-precision models match.

These are the PyTorch forms; the native CPU backend (layers/ops_cpu.py) does
the norm in one call and folds the residual add into it, in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op, same math
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next block's input."""
    x = x + delta
    return x, rms_norm(x, weight, eps)
