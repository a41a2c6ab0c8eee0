"""Compute backends: the one place where a kernel is chosen.

Layers and models call `ops.linear`, `ops.lora`, `ops.paged_attention`,
`ops.rms_norm`, ... on the backend the `ModelRunner` picked once at start-up;
no layer asks which device or library it runs on. Backends:

- `TorchOps` (this module): PyTorch operations on any device, the reference
  every other backend is tested against. On CPU float32 its dense weights are
  packed for oneDNN (layers/linear.py).
- `CpuNativeOps` (layers/ops_cpu.py): loraserve's own CPU kernels
  (layers/native_cpu.py) where they apply, `TorchOps` for the rest.
- A `TritonOps` for CUDA goes beside them: subclass `TorchOps`, override the
  ops it accelerates, and add it to `select_ops`.

Why a class per backend and not per-op switches: a backend is a consistent
set of layouts (a panel-packed weight only means something to the kernels that
made it), so choosing once keeps every layout with the code that reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from loraserve.layers import activation, attention, lora, norm, rotary
from loraserve.layers.attention import AttentionMeta
from loraserve.layers.decode_stack import DecodeLayerSpec, DecodeStack, DecodeTop
from loraserve.layers.linear import Linear, onednn_linear, pack_onednn, packing_supported
from loraserve.layers.lora import LoraBatch
from loraserve.layers.precision import Precision
from loraserve.layers.quantized_linear import LOWP_PLAIN, make_plain, plain_linear, plain_rows

log = logging.getLogger(__name__)


class TorchOps:
    """PyTorch reference backend (any device, any dtype)."""

    name = "torch"

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        pack: bool = True,
        weights: str = "plain",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: activations; `pack`: let dense weights take a packed layout where this backend
        has one; `weights`: "plain" or a low-precision format ("bf16", "int8"), `adapter_dtype`:
        the LoRA table's (layers/precision.py)."""
        self.device, self.dtype, self.pack = device, dtype, pack
        self.weights, self.adapter_dtype = weights, adapter_dtype or dtype

    def decode_reads(self, cache_dtype: torch.dtype) -> bool:
        """Whether this backend's decode attention reads single-token rows straight from a cache
        of `cache_dtype`. PyTorch's path gathers each row's context first, so a verification's
        tokens stay one row of several queries here (engine/batch_builder.py `_paged_rows`)."""
        return False

    # ---- dense projections ----------------------------------------------------------------------
    def make_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """Wrap `weight` [out, in] (and `bias`) in this backend's fastest layout for it."""
        out_f, in_f = weight.shape
        if self.weights in LOWP_PLAIN:
            return make_plain(weight, bias, self.weights)
        if self.pack and packing_supported(weight.dtype, weight.device):
            return Linear(pack_onednn(weight), bias, out_f, in_f, layout="onednn")
        return Linear(weight, bias, out_f, in_f)

    def linear(self, x: torch.Tensor, w: Linear) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if w.layout == "plain":
            return F.linear(x, w.weight, w.bias)
        if w.layout == "onednn":
            return onednn_linear(x, w)
        if w.layout in LOWP_PLAIN:
            return plain_linear(x, w)
        raise ValueError(f"{self.name} ops cannot run a {w.layout!r} weight")

    def embedding(self, ids: torch.Tensor, table: torch.Tensor | Linear) -> torch.Tensor:
        """Rows `ids` of an embedding table, or of a tied lm_head that holds it (`Linear`)."""
        if isinstance(table, Linear):
            if table.layout in LOWP_PLAIN:
                return plain_rows(table, ids).to(self.dtype)
            if table.layout != "plain":
                raise ValueError(f"{self.name} ops cannot read rows of a {table.layout!r} weight")
            table = table.weight
        return F.embedding(ids, table).to(self.dtype)  # a bf16 table under fp32 compute: converted

    def can_share_embedding(self, lm_head: Linear) -> bool:
        """Whether `embedding` can read a tied input embedding out of this packed lm_head."""
        return lm_head.layout in ("plain", *LOWP_PLAIN)

    # ---- batched multi-LoRA ---------------------------------------------------------------------
    def lora_batch(self, token_slots: list[tuple[int, int, int]]) -> LoraBatch | None:
        """This step's token -> adapter-slot layout, in the form `lora` reads."""
        return lora.build_lora_batch(token_slots, self.device)

    def lora(
        self,
        ys: Sequence[torch.Tensor],
        x: torch.Tensor,
        a: torch.Tensor,
        bs: Sequence[torch.Tensor],
        lb: LoraBatch,
        slot_rank: torch.Tensor | None = None,
    ) -> None:
        """ys[j] += LoRA delta of member j of a group that reads `x` (see layers/lora.py)."""
        if a.dtype != x.dtype:  # a bf16 slot table under fp32 compute: the delta in the adapter dtype
            deltas = [torch.zeros(y.shape, dtype=a.dtype, device=y.device) for y in ys]
            lora.apply_lora(deltas, x.to(a.dtype), a, bs, lb)
            for y, d in zip(ys, deltas):
                y += d
            return
        lora.apply_lora(ys, x, a, bs, lb)

    # ---- attention ------------------------------------------------------------------------------
    def paged_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotated) -> [T, Hq, D]; writes k/v into the cache."""
        return attention.paged_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap)

    # ---- element-wise ---------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return norm.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta)); may update `x` in place, so callers must own it."""
        return norm.add_rms_norm(x, delta, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor, inter: int) -> torch.Tensor:
        return activation.silu_mul(gate_up, inter)

    def gelu_tanh_mul(self, gate_up: torch.Tensor, inter: int) -> torch.Tensor:
        return activation.gelu_tanh_mul(gate_up, inter)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotary.apply_rotary(x, cos, sin)

    # ---- whole decode steps ---------------------------------------------------------------------
    def decode_stack(
        self, layers: Sequence[DecodeLayerSpec], eps: float, top: DecodeTop | None = None
    ) -> DecodeStack | None:
        """The layers in one call per decode step (layers/decode_stack.py), or None where this
        backend has no such call or cannot run one of the layers' weights in it; with `top`
        (what runs around the layers), also bursts of steps where it can."""
        return None

    # ---- logits ---------------------------------------------------------------------------------
    @staticmethod
    def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per row of float32 `scores` [B, V] (masked tokens -inf), the first token whose cumulative
        probability exceeds its uniform `u` [B] times the total (engine/sampling.py `draw`).
        Masked tokens have zero mass, so the CDF is flat across them and the search can never
        land on one."""
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1]
        # u < 1, but u * total may round up to total; stay strictly below it.
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        picked = torch.searchsorted(cdf, x[:, None], right=True).squeeze(1)
        return picked.clamp_(max=scores.shape[-1] - 1)

    @staticmethod
    def argmax_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of float32 `scores` [B, V]: (first index of the max, logsumexp, every entry
        finite): a greedy token and its logprob without a [B, V] log_softmax where a backend has
        a fused kernel. Here lse = x[argmax] - log_softmax(x)[argmax]: PyTorch's fused CPU
        log_softmax runs ~2.5x faster than its logsumexp, and at the max the difference is exact."""
        arg = scores.argmax(dim=-1, keepdim=True)
        lse = scores.gather(-1, arg) - torch.log_softmax(scores, dim=-1).gather(-1, arg)
        return arg.squeeze(-1), lse.squeeze(-1), torch.isfinite(scores).all(dim=-1)


def select_ops(
    device: torch.device,
    dtype: torch.dtype,
    native: bool = True,
    pack: bool = True,
    precision: Precision | None = None,
) -> TorchOps:
    """The fastest backend for this device and dtype (the compute dtype; `precision` says how
    weights and adapters are held, layers/precision.py); `native=False` is the one off-switch."""
    weights = precision.weights if precision else "plain"
    adapter_dtype = precision.adapter if precision else dtype
    if native and device.type == "cpu":
        from loraserve.layers.native_cpu import cpu_kernels
        from loraserve.layers.ops_cpu import CpuNativeOps

        kernels = cpu_kernels(device, dtype)  # None: not built, or not for this dtype
        if kernels and (weights != "plain" or adapter_dtype != dtype):
            from loraserve.layers.ops_lowp_cpu import LowpCpuOps

            bf16_act = precision is not None and precision.load == torch.bfloat16
            return LowpCpuOps(device, dtype, kernels, pack, weights, adapter_dtype, bf16_act)
        if kernels:
            return CpuNativeOps(device, dtype, kernels, pack)
    # CUDA: a TritonOps will be chosen here when one exists
    return TorchOps(device, dtype, pack, weights, adapter_dtype)
