"""The boundary between scheduling and tensors: the model, its KV cache, the LoRA slot table
and the `Ops` backend, owned together.

The engine hands the runner a step's sequences and gets back hidden states and logits; it
never touches a cache tensor, a slot-table layout or a kernel. Everything the forward reads
is allocated here, once, at start-up, in this order: the backend (so weights take its packed
layouts), the weights, then the KV cache and the slot table from what memory is left, then
the model built from all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.engine.adapter_slots import AdapterSlots
from loraserve.engine.batch_builder import StepLayout, block_tables_tensor, build_forward_batch
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.config import EngineConfig
from loraserve.engine.logits_pipeline import is_sampling
from loraserve.engine.memory_plan import adapter_slots, kv_cache_blocks
from loraserve.engine.sequence import Sequence
from loraserve.host_allocator import return_freed_memory, zeros_on_huge_pages
from loraserve.layers.forward_batch import BurstBatch, ForwardBatch
from loraserve.layers.lora import LoraTable
from loraserve.layers.ops import select_ops
from loraserve.layers.precision import resolve_precision
from loraserve.models.config import ModelConfig
from loraserve.models.registry import model_class
from loraserve.models.spec import linear_shapes, lora_groups
from loraserve.models.weights import load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    hidden: torch.Tensor  # [T, hidden] final hidden states of every token fed this step
    logits: torch.Tensor  # [R, vocab] float32, the rows of `layout.logit_rows`, flattened in order
    starts: list[int]  # first logits row of each sequence
    layout: StepLayout


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        mc: ModelConfig,
        cfg: EngineConfig,
        max_total_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # weights in the serving dtype (or int8), activations in `dtype`, KV cache in `prec.kv` (layers/precision.py)
        self.precision = prec = resolve_precision(
            dtype, device, cfg.quantize, cfg.adapter_dtype, cfg.kv_cache_dtype
        )
        dtype = prec.compute
        self.mc, self.dtype, self.device, self.block_size = mc, dtype, device, cfg.block_size
        cls = model_class(mc.architecture)
        self.ops = select_ops(device, dtype, cfg.native_kernels, cfg.pack_weights, prec)
        held = str(prec.load).replace("torch.", "") if prec.weights == "plain" else prec.weights
        if prec.weights == "int8" and prec.load == torch.bfloat16:
            held += " of a bfloat16 model"  # many-row GEMMs take bf16 activations (layers/precision.py)
        log.info(
            "compute backend: %s (%s, %s; weights %s, adapters %s)",
            self.ops.name,
            device,
            str(dtype).replace("torch.", ""),
            held,
            str(prec.adapter).replace("torch.", ""),
        )
        weights = load_checkpoint(
            model_dir, mc.num_hidden_layers, prec.load, device, vector_dtype=prec.compute
        )
        num_blocks = kv_cache_blocks(cfg, mc, max_total_tokens, prec.kv, device)
        shape = (num_blocks, cfg.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [
            (zeros_on_huge_pages(shape, prec.kv, device), zeros_on_huge_pages(shape, prec.kv, device))
            for _ in range(mc.num_hidden_layers)
        ]
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        projections = cls.projections(mc)
        plan = adapter_slots(cfg, mc, prec.adapter, device)
        self.lora = LoraTable(
            linear_shapes(projections),
            mc.num_hidden_layers,
            plan.num_slots,
            cfg.max_lora_rank,
            prec.adapter,
            device,
            groups=lora_groups(projections),
        )
        self.slots = AdapterSlots(self.lora, plan.budget_bytes)
        self.model = cls(mc, weights, self.ops, self.lora, self.kv_caches)
        del weights  # what the model did not keep is released here
        return_freed_memory()  # and the loader's and packing's temporaries go back to the OS
        self.vocab_size = self.model.vocab_size
        self.group_size = mc.num_attention_heads // mc.num_key_value_heads
        self.drafts_as_rows = self.ops.decode_reads(prec.kv)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.capacity * self.block_size  # `capacity` already leaves out the null block

    def prepare(self, decodes: list[Sequence], prefills: list[Sequence]) -> tuple[ForwardBatch, StepLayout]:
        return build_forward_batch(
            decodes,
            prefills,
            self.block_size,
            self.model.rotary,
            self.group_size,
            self.device,
            self.ops.lora_batch,
            self.drafts_as_rows,
        )

    def execute(self, decodes: list[Sequence], prefills: list[Sequence]) -> StepResult:
        """One forward over every new token; logits only for the rows the sequences need."""
        fb, layout = self.prepare(decodes, prefills)
        hidden = self.model.forward(fb)
        rows = [r for rs in layout.logit_rows for r in rs]
        if rows:
            picked = hidden  # rows are ascending and distinct: all of them is hidden as it is
            if len(rows) < hidden.shape[0]:
                picked = hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device))
            logits = self.model.logits(picked)
        else:  # every row is a chunk of a prompt that continues next step (chunked prefill)
            logits = torch.empty(0, self.vocab_size, device=self.device)
        starts, offset = [], 0
        for rs in layout.logit_rows:
            starts.append(offset)
            offset += len(rs)
        return StepResult(hidden=hidden, logits=logits, starts=starts, layout=layout)

    def run_burst(self, seqs: list[Sequence], steps: int) -> list[list[tuple[int, float, bool]]] | None:
        """`steps` decode steps of `seqs` (each one token behind: its last token not yet in the
        cache; each greedy or sampled at its temperature alone, logits_pipeline.plain_rows) in one
        call to the model (engine/decode_bursts.py): per sequence, per step, (token, logprob,
        logits all finite). Every block table must already reach the last step's position. None
        where the model or backend has no such call (the generators then as they were)."""
        bs = self.block_size
        reach = max(seq.num_cached + steps for seq in seqs)  # positions the last step reads
        tables = block_tables_tensor([seq.block_table for seq in seqs], reach, bs)
        ids_pos = torch.tensor(
            [[seq.all_ids[seq.num_cached] for seq in seqs], [seq.num_cached for seq in seqs]]
        )
        lora = self.ops.lora_batch(
            [(i, i + 1, seq.slot) for i, seq in enumerate(seqs) if seq.slot is not None]
        )
        ids, positions = ids_pos.to(self.device).unbind(0)
        burst = BurstBatch(ids, positions, steps, tables.to(self.device), bs, lora)
        sampled = [i for i, seq in enumerate(seqs) if is_sampling(seq.params)]
        states = []
        if sampled:
            gens = [seqs[i].generator or default_generator(self.device) for i in sampled]
            states = [(g, g.get_state()) for g in gens]
            burst.temperatures, burst.uniforms = burst_draws(seqs, sampled, steps, self.device)
        out = self.model.burst_steps(burst)
        if out is None:
            for g, state in states:
                g.set_state(state)
            return None
        tokens, logprobs, finite = (t.t().tolist() for t in out)  # [seqs][steps]
        return [list(zip(tokens[i], logprobs[i], finite[i])) for i in range(len(seqs))]

    def all_logits(self, seq: Sequence) -> torch.Tensor:
        """Logits at every new position of one prefill ([L, vocab]), for scoring."""
        fb, _ = self.prepare([], [seq])
        return self.model.logits(self.model.forward(fb))

    def project_vocab(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head alone (Medusa v2 heads share it)."""
        return self.ops.linear(hidden, self.model.lm_head)

    def zero_blocks(self, block_table: list[int]) -> None:
        """Zero a failed sequence's blocks once nobody holds them (`BlockManager.take_dirty`): a
        masked-out position still multiplies its value by 0, so NaN/inf left there would poison
        the next owner."""
        if not block_table:
            return
        idx = torch.tensor(block_table, device=self.device)
        for k, v in self.kv_caches:
            k[idx] = 0
            v[idx] = 0


def burst_draws(
    seqs: list[Sequence], sampled: list[int], steps: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A burst's sampled rows: every row's temperature (0: greedy) and the uniforms their
    generators give for `steps` steps, drawn as the steps one at a time would draw them (step by
    step, row by row, one each: sampling.py's `draw`), so a seeded request's text does not depend
    on whether its steps ran in bursts. A row that ends inside the burst leaves its later draws
    unused; its generator is not read again (rows without a seed share torch's default generator,
    whose draws no request can reproduce anyway)."""
    temps = torch.zeros(len(seqs), dtype=torch.float32)
    for i in sampled:
        temps[i] = seqs[i].params.temperature
    u = torch.zeros(steps, len(seqs), dtype=torch.float32)
    for s in range(steps):
        for i in sampled:
            u[s, i] = torch.rand((), generator=seqs[i].generator, device=device)
    return temps.to(device), u.to(device)


def default_generator(device: torch.device) -> torch.Generator:
    """The generator `torch.rand(..., generator=None, device=device)` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator
