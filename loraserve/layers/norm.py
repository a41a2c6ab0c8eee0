"""RMSNorm computed in float32, as HF Llama does, so low-precision models match.

With the native CPU kernels (float32 on CPU) one call does the norm, and
`add_rms_norm` also folds in the residual add before it, in place; elsewhere
the same math runs as PyTorch ops.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: ModuleType | None = None
) -> torch.Tensor:
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op, same math
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, kernels: ModuleType | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next block's input.
    The kernel updates `x` in place, so callers must own `x` (the residual stream does)."""
    if kernels is not None:
        return x, kernels.add_rms_norm_(x, delta, weight, eps)
    x = x + delta
    return x, rms_norm(x, weight, eps)
