"""A decode step's decoder layers in one native call, where the backend has one.

Why: at batch 1 a small model's step is mostly short kernels, and each trip from Python to a
kernel costs a few microseconds of interpreter, argument conversion and output allocation,
240 times a token on SmolLM2-135M (csrc/decode_stack_cpu.cpp has the figures). A model declares
its layers once (`DecodeLayerSpec`); the backend (`Ops.decode_stack`) turns them into a
`DecodeStack` that runs the same kernels in the same order, so its output equals the Python
loop's bit for bit. Rows with adapters take each projection's LoRA as `LoraLinear` does, from
per-layer views of the slot table handed to the native side again whenever the table is
re-allocated (`LoraTable.generation`). Steps it does not cover (prefills, a slot table in
PyTorch's layout) get None back and take the model's own forward. A Medusa verification is
covered: the batch builder lays its tokens out as single-token rows (engine/batch_builder.py).

Batch-1 decode on SmolLM2-135M in-process, alternated with the Python loop (2-core Zen 5, AVX-512
build): int8 186 vs 169 tok/s, bf16 86 vs 79, fp32 47 vs 45; with an adapter on the request int8
191 vs 157, fp32 78 vs 74.

Steps of up to 4 rows then run in one parallel region (the native `run_region`;
`LORASERVE_DECODE_REGION=0` keeps the per-kernel path): the threads split each projection's
panels and attention's items themselves, keep their own copy of the residual stream and its
norms, and run SwiGLU on their own columns. Same model, alternated with the per-kernel path, bit
for bit the same tokens: the 30 layers' int8 step 2.41 vs 2.91 ms (4.76 vs 5.34 at a 2,000-token
context); engine batch-1 int8 231 vs 208 tok/s, bf16 165 vs 149, int8 with an adapter 180 vs 172.
Adapter rows' deltas are split over the threads too (csrc/region_lora.h: each thread runs one of
the two chains of sums a row's shrink already keeps, then the deltas of its own columns), where
one thread used to add them while the others waited (`LORASERVE_REGION_LORA_SPLIT=0` keeps that):
batch-1 with the demo's rank-8 adapter, alternated rep by rep (bench/adapter_decode.py, 2-core
Zen 4, AVX-512 / AVX2 build), int8 165 -> 173 / 172 -> 182 tok/s (base 199 / 208), bf16 115 -> 118
/ 97 -> 102, fp32 level (70 / 54-56).

Given what the model runs around its layers (`DecodeTop`: embedding, first norm, rotary table,
lm_head), the stack also runs a decode burst (`burst`, csrc/decode_steps_cpu.cpp): several
steps in one call, each fed the token the one before picked, its argmax or, for a row sampled at
a temperature, its draw at a uniform the row's generator gave beforehand (engine/decode_bursts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loraserve.layers.attention import all_single_decodes
from loraserve.layers.forward_batch import BurstBatch, ForwardBatch
from loraserve.layers.linear import Linear
from loraserve.layers.lora import LoraBatch
from loraserve.layers.rotary import RotaryTable

if TYPE_CHECKING:  # lora_linear imports the Ops backends, which build stacks
    from loraserve.layers.lora_linear import LoraLinear


@dataclass
class DecodeLayerSpec:
    """One Llama-family layer as the stack runs it: pre-norm attention (q|k|v, rotary, paged
    attention, o), residual + norm, SwiGLU MLP (gate|up, silu * up, down), residual + norm."""

    qkv: LoraLinear
    o: LoraLinear
    gate_up: LoraLinear
    down: LoraLinear
    post_norm: torch.Tensor  # after attention
    next_norm: torch.Tensor  # after the MLP: the next layer's input norm, or the final one
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    n_heads: int
    n_kv_heads: int
    scale: float

    @property
    def projections(self) -> tuple[LoraLinear, LoraLinear, LoraLinear, LoraLinear]:
        """In the native stack's group order (csrc/decode_stack_cpu.cpp `set_lora`)."""
        return self.qkv, self.o, self.gate_up, self.down


def single_decode_rows(fb: ForwardBatch, num_tokens: int) -> bool:
    """Whether every row of the step is one new token of a sequence that reads the paged cache."""
    meta = fb.attn
    return not meta.fresh and len(meta.paged) == 1 and all_single_decodes(meta.paged[0], num_tokens)


@dataclass
class DecodeTop:
    """What a step runs around the layers, as the model's forward and `logits` run it: the token
    embedding (a plain table, or the tied lm_head that holds it), the first layer's input norm,
    the rotary table and the lm_head. With it, a backend's stack can run several decode steps
    in one call (`DecodeStack.burst`)."""

    embed: torch.Tensor | Linear
    in_norm: torch.Tensor
    rotary: RotaryTable
    lm_head: Linear


class DecodeStack:
    """The native stack (`kernels.DecodeStack`) with the step checks in front of it; `head`: the
    native `DecodeHead` built from the model's `DecodeTop`, or None (no bursts)."""

    def __init__(self, native: Any, layers: Sequence[DecodeLayerSpec], head: Any = None) -> None:
        self.native, self.layers, self.head = native, list(layers), head
        self.table = self.layers[0].qkv.table  # None: the model serves no adapters
        self.generation = -1  # of the table whose views the native side holds

    def __call__(self, x: torch.Tensor, h: torch.Tensor, fb: ForwardBatch) -> torch.Tensor | None:
        """The final norm of the residual stream `x` (updated in place) after every layer, from
        `h`, the first layer's normed input; None where the step is not the stack's to run."""
        if not single_decode_rows(fb, x.shape[0]):
            return None
        grp, lora = fb.attn.paged[0], self._adapter_rows(fb.lora)
        if lora is None:
            return None
        return self.native.run(
            x, h, fb.cos, fb.sin, fb.attn.slot_mapping, grp.block_tables, grp.ctx_lens, *lora
        )

    def burst(self, burst: BurstBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`burst.steps` decode steps of its single-token rows, each step fed the token the one
        before picked (its argmax, or a sampled row's draw): ([steps, M] tokens, their logprobs,
        whether each step's logits were all finite).
        None where this stack cannot (no head; adapter rows laid out for PyTorch's bmm): the
        caller then steps one at a time."""
        if self.head is None:
            return None
        b, lora = burst, self._adapter_rows(burst.lora)
        if lora is None:
            return None
        out = self.native.run_burst(
            self.head,
            b.ids,
            b.positions,
            b.steps,
            b.block_tables,
            b.block_size,
            *lora,
            temperature=b.temperatures,
            uniforms=b.uniforms,
        )
        return out[0], out[1], out[2]

    def _adapter_rows(self, lb: LoraBatch | None) -> tuple[torch.Tensor, ...] | None:
        """The native call's adapter arguments (rows, their slots, the table's ranks; none for a
        step without adapter rows), the table's views handed over first if it was re-allocated;
        None where the rows are laid out for PyTorch's bmm or there is no table."""
        if lb is None:
            return ()
        if self.table is None or lb.rows is None:
            return None
        if self.table.generation != self.generation:
            self._hand_over_table()
        return lb.rows, lb.row_slots, self.table.slot_rank

    def _hand_over_table(self) -> None:
        t = self.table
        assert t is not None
        for i, spec in enumerate(self.layers):
            for g, p in enumerate(spec.projections):
                a = t.a_layers[p.group][p.layer]
                bs = [t.b_layers[name][p.layer] for name in p.names]
                self.native.set_lora(i, g, a, bs, [e - s for s, e in p.bounds])
        self.generation = t.generation
