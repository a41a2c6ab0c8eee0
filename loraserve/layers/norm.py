"""RMSNorm computed in float32, as HF Llama does, so low-precision models match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused kernel, same math
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
