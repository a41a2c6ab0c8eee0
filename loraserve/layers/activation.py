"""SwiGLU's gate: silu(gate) * up, read from the fused gate|up projection's output.

One native call on CPU (`layers/native_cpu.py`), three PyTorch ops elsewhere.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor, inter: int, kernels: ModuleType | None = None) -> torch.Tensor:
    """gate_up: [T, 2*inter] -> [T, inter]."""
    if kernels is not None:
        return kernels.silu_mul(gate_up)
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
