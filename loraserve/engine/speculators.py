"""Which Medusa heads draft for which request.

The engine's default heads (the server's `--adapter-id`) draft for every
request without heads of its own; an adapter may bring its own heads (LoRAX's
rule: only when a default exists). Heads are copied to the device once and
cached by key. Each step, every set of heads runs once over the rows it
drafts for (`propose`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from loraserve.adapters.lora_weights import LoraAdapter, MedusaHeads
from loraserve.engine.errors import RequestError
from loraserve.engine.params import SamplingParams
from loraserve.engine.sequence import Sequence
from loraserve.layers.medusa import medusa_logits

MAX_CACHED_HEADS = 64


class Speculators:
    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        device: torch.device,
        dtype: torch.dtype,
        cap: int | None = None,
    ) -> None:
        """`cap`: drafts per step; None = as many as the default heads have."""
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.device, self.dtype = device, dtype
        self.cap = cap
        self.default: MedusaHeads | None = None
        self._cache: OrderedDict[str, MedusaHeads] = OrderedDict()  # device copies of per-request heads

    def set_default(self, heads: MedusaHeads | None, cap: int | None = None) -> None:
        """Heads that draft for every request without its own, and the drafts-per-step cap."""
        self.cap = cap
        if heads is not None:
            self._check(heads)
            heads = heads.to(self.device, self.dtype)
        self.default = heads

    @property
    def tokens(self) -> int:
        """Drafts per step: the cap, or as many as the default heads have."""
        cap = self.cap
        if self.default is None:
            return cap or 0
        return self.default.num_heads if cap is None else cap

    def _check(self, heads: MedusaHeads) -> None:
        if heads.hidden_size != self.hidden_size:
            raise ValueError(
                f"Medusa heads have hidden size {heads.hidden_size}, the model {self.hidden_size}"
            )
        if heads.proj is not None and heads.proj.shape[1] != self.vocab_size:
            raise ValueError("Medusa heads' vocabulary does not match the model's")

    def for_request(self, adapter: LoraAdapter | None, params: SamplingParams) -> MedusaHeads | None:
        """LoRAX's rule: per-request heads only when the server runs a default speculator.

        Unlike LoRAX, per-request heads may be v1 or v2 and have any number of
        heads; drafts are capped by `tokens` either way.
        """
        own = adapter.medusa if adapter is not None else None
        if own is not None and self.default is None:
            raise RequestError(
                "this adapter carries Medusa heads, but speculative decoding needs the server to be "
                "started with a default Medusa adapter (--adapter-id)"
            )
        history_dependent = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
            or params.watermark
        )
        if self.tokens <= 0 or history_dependent:
            return None  # penalties and watermark depend on the history, which drafts change mid-verification
        if own is None:
            return self.default
        heads = self._cache.get(own.key)
        if heads is None:
            self._check(own)
            heads = own.to(self.device, self.dtype)
            self._cache[own.key] = heads
            while len(self._cache) > MAX_CACHED_HEADS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(own.key)
        return heads

    def propose(
        self,
        hidden: torch.Tensor,
        draft_rows: list[tuple[Sequence, int]],
        lm_head: Callable[[torch.Tensor], torch.Tensor],
        max_total_tokens: int,
    ) -> None:
        """Set `seq.drafts` from the hidden state of each sequence's last accepted position."""
        groups: dict[int, list[tuple[Sequence, int]]] = {}
        for seq, row in draft_rows:
            groups.setdefault(id(seq.speculator), []).append((seq, row))
        for members in groups.values():
            heads = members[0][0].speculator
            idx = torch.tensor([row for _, row in members], device=hidden.device)
            drafts = medusa_logits(hidden[idx], heads, lm_head).argmax(dim=-1).t().tolist()
            for (seq, _), d in zip(members, drafts):
                # never draft past max_new_tokens or the context: those tokens could not be emitted
                room = (
                    min(seq.params.max_new_tokens - len(seq.output_ids), max_total_tokens - seq.num_tokens)
                    - 1
                )
                seq.drafts = d[: max(0, min(room, self.tokens))]
