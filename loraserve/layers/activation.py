"""SwiGLU's gate: silu(gate) * up, read from the fused gate|up projection's output.

Three PyTorch ops here; one native call with the CPU backend (layers/ops_cpu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """gate_up: [T, 2*inter] -> [T, inter]."""
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def gelu_tanh_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """Gemma's gate: gelu_tanh(gate) * up, from the fused gate|up output [T, 2*inter]."""
    return F.gelu(gate_up[:, :inter], approximate="tanh") * gate_up[:, inter:]
