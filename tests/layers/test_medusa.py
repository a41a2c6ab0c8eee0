"""`medusa_logits` against an independent reference: the Medusa project's module layout in plain torch.

The reference is built from the raw state dict with `load_state_dict(strict=True)`,
so the tensor names themselves (`{i}.{j}.linear.weight`, `{i}.{L}.weight`) are
checked too, not only the arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraserve.adapters.medusa_format import medusa_heads_from_state_dict
from loraserve.layers.medusa import medusa_hidden, medusa_logits
from tests.fixtures.medusa_heads import medusa_state_dict

H, V, N = 48, 200, 7


class ResBlock(nn.Module):
    """The Medusa project's block: x + SiLU(Linear(x))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def reference_heads(
    sd: dict[str, torch.Tensor], num_heads: int, num_layers: int, own_proj: bool
) -> nn.ModuleList:
    heads = nn.ModuleList(
        nn.Sequential(
            *[ResBlock(H) for _ in range(num_layers)], *([nn.Linear(H, V, bias=False)] if own_proj else [])
        )
        for _ in range(num_heads)
    )
    heads.load_state_dict(sd, strict=True)
    return heads


def reference_logits(
    heads: nn.ModuleList, hidden: torch.Tensor, lm_head: torch.Tensor, own_proj: bool
) -> torch.Tensor:
    with torch.no_grad():
        outs = [h(hidden) if own_proj else h(hidden) @ lm_head.T for h in heads]
    return torch.stack(outs)


def _case(num_heads: int, num_layers: int, own_proj: bool, seed: int = 0):
    sd = medusa_state_dict(H, V, num_heads, num_layers, own_proj, seed=seed)
    cfg = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers}
    heads = medusa_heads_from_state_dict(sd, cfg, key="t")
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(N, H, generator=g)
    lm_head = torch.randn(V, H, generator=g) * 0.2
    expected = reference_logits(
        reference_heads(sd, num_heads, num_layers, own_proj), hidden, lm_head, own_proj
    )
    return heads, hidden, lm_head, expected


@pytest.mark.parametrize(
    ("num_heads", "num_layers", "own_proj"),
    [(3, 1, False), (1, 1, False), (5, 1, False), (4, 2, False), (2, 1, True), (3, 3, True), (2, 0, True)],
)
def test_matches_reference(num_heads: int, num_layers: int, own_proj: bool) -> None:
    heads, hidden, lm_head, expected = _case(
        num_heads, num_layers, own_proj, seed=num_heads * 10 + num_layers
    )
    got = medusa_logits(hidden, heads, lm_head)
    assert got.shape == (num_heads, N, V) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own_proj", [False, True])
def test_include_base_puts_base_logits_first(own_proj: bool) -> None:
    heads, hidden, lm_head, expected = _case(3, 1, own_proj)
    got = medusa_logits(hidden, heads, lm_head, include_base=True)
    assert got.shape == (4, N, V)
    torch.testing.assert_close(got[0], hidden @ lm_head.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], expected, rtol=1e-5, atol=1e-5)


def test_heads_are_independent_of_other_rows() -> None:
    """Each row's drafts depend on that row only, so batching requests cannot change drafts."""
    heads, hidden, lm_head, _ = _case(3, 2, False)
    whole = medusa_logits(hidden, heads, lm_head)
    for i in (0, 3, N - 1):
        torch.testing.assert_close(medusa_logits(hidden[i : i + 1], heads, lm_head)[:, 0], whole[:, i])


def test_empty_batch_and_bad_shape() -> None:
    heads, _, lm_head, _ = _case(2, 1, False)
    assert medusa_logits(torch.zeros(0, H), heads, lm_head).shape == (2, 0, V)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        medusa_logits(torch.zeros(2, 3, H), heads, lm_head)


def test_zero_initialised_heads_repeat_base_logits() -> None:
    """Medusa training starts from zero blocks: then every head equals the base prediction."""
    heads, hidden, lm_head, _ = _case(3, 1, False)
    heads.weight.zero_()
    heads.bias.zero_()
    torch.testing.assert_close(medusa_hidden(hidden, heads.weight, heads.bias), hidden.expand(3, -1, -1))


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    heads, hidden, lm_head, expected = _case(3, 1, False)
    moved = heads.to(device, dtype)
    got = medusa_logits(hidden.to(device, dtype), moved, lm_head.to(device, dtype))
    assert got.device.type == device and got.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
    # host-side float32 heads also work on device tensors (converted on the fly)
    got2 = medusa_logits(hidden.to(device, dtype), heads, lm_head.to(device, dtype))
    torch.testing.assert_close(got2.cpu(), expected, rtol=tol, atol=tol)
