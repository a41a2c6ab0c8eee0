"""Per-request state that lives in the engine between steps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.adapters.lora_weights import LoraAdapter, MedusaHeads
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.params import SamplingParams
from loraserve.engine.stop import StopChecker


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None
    seed: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stop: StopChecker | None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None  # adapter slot while running
    status: SeqStatus = SeqStatus.WAITING
    prefill_reported: bool = False
    text: str = ""
    speculator: MedusaHeads | None = None  # device copy of the heads that draft for this request
    drafts: list[int] = field(default_factory=list)  # proposed tokens to verify in the next step
    spec_steps: int = 0  # steps that verified drafts
    spec_tokens: int = 0  # tokens emitted by those steps
    grammar: Any = None  # llguidance LLMatcher of a structured-output request (engine/grammar.py)
    block_hashes: list[bytes] = field(default_factory=list)  # addresses of full blocks (prefix_cache.py)
    committed_blocks: int = 0  # leading blocks of the table already offered to the prefix cache
    prefill_end: int | None = None  # this step feeds tokens [num_cached, prefill_end); None: all the rest
    admitted_now: bool = False  # this step is the sequence's first forward since it was (re)admitted

    @property
    def uses_slot(self) -> bool:
        """Medusa-only adapters carry no LoRA weights and need no slot."""
        return self.adapter is not None and bool(self.adapter.modules)

    @property
    def prefilling(self) -> bool:
        """This step feeds a chunk of the prompt that stops short of its end (chunked prefill):
        nothing is sampled from it."""
        return self.prefill_end is not None and self.prefill_end < self.num_tokens

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None
