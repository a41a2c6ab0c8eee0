"""The in-process engine: requests in, tokens out, one forward pass per step.

`Engine.step()` runs one iteration of continuous batching: schedule (decode
everyone running, admit new requests), one forward over all of their new
tokens — rows of many different adapters together — then sample and finish
requests on EOS, length or stop sequences, freeing their blocks at once.
`AsyncEngine` (async_engine.py) drives this loop from a thread for servers.
"""

from __future__ import annotations

import logging
import random
import uuid
from pathlib import Path

import torch

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.medusa_format import MedusaHeads
from loraserve.engine.adapter_slots import AdapterSlots
from loraserve.engine.batch_builder import StepLayout, build_forward_batch
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.config import DTYPES, EngineConfig
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.memory_plan import adapter_slots, kv_cache_blocks, resolve_lengths
from loraserve.engine.params import RequestOutput, SamplingParams, TokenInfo
from loraserve.engine.sampling import SamplingRow, make_generator, sample
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import Sequence
from loraserve.engine.speculative import verify_drafts
from loraserve.engine.speculators import Speculators
from loraserve.engine.stop import StopChecker
from loraserve.engine.tokenizer import Tokenizer
from loraserve.engine.watermark import apply_watermark
from loraserve.host_allocator import keep_freed_memory, zeros_on_huge_pages
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.lora import LoraTable
from loraserve.layers.native_cpu import cpu_kernels
from loraserve.models import load_model
from loraserve.models.config import ModelConfig

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        cfg = config or EngineConfig()
        self.config = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        self.dtype = DTYPES[cfg.dtype]
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # step temporaries live in host memory: reuse it, don't re-fault it
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        mc = self.model_config
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(mc.eos_token_ids)
        resolve_lengths(cfg, mc)
        # None on CUDA, other dtypes, or when switched off: the model then runs PyTorch ops
        self.kernels = cpu_kernels(self.device, self.dtype) if cfg.native_kernels else None
        self.model = load_model(self.model_dir, mc, self.dtype, self.device, cfg.pack_weights, self.kernels)
        self._allocate_kv_cache()
        self._allocate_lora_table()
        self.scheduler = Scheduler(
            self.blocks, self.slots, cfg.max_num_seqs, cfg.max_batch_prefill_tokens, cfg.adapter_cycle_time_s
        )
        self._seqs: dict[str, Sequence] = {}
        self.tokens_generated = 0
        self.speculators = Speculators(
            mc.hidden_size, self.model.lm_head.out_features, self.device, self.dtype, cfg
        )
        self.spec_steps = 0
        self.spec_tokens = 0
        self.steps = 0
        self.last_batch_size = 0

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig | None = None) -> Engine:
        return cls(model_dir, config)

    # ---- set-up ---------------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> None:
        cfg, mc = self.config, self.model_config
        num_blocks = kv_cache_blocks(cfg, mc, self.dtype, self.device)
        shape = (num_blocks, cfg.block_size, mc.num_key_value_heads, mc.head_dim)
        self.model.kv_caches = [
            (
                zeros_on_huge_pages(shape, self.dtype, self.device),
                zeros_on_huge_pages(shape, self.dtype, self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.blocks = BlockManager(num_blocks, cfg.block_size)

    def _allocate_lora_table(self) -> None:
        cfg, mc = self.config, self.model_config
        num_slots = adapter_slots(cfg, mc, self.dtype, self.device)
        table = LoraTable(
            mc.linear_shapes(),
            mc.num_hidden_layers,
            num_slots,
            cfg.max_lora_rank,
            self.dtype,
            self.device,
            groups=self.model.LORA_GROUPS,
        )
        self.model.lora = table
        self.slots = AdapterSlots(table)

    # ---- requests ------------------------------------------------------------------------------
    def check_adapter(self, adapter: LoraAdapter) -> None:
        """Refuse adapters the slot table cannot hold before they reach the step loop."""
        mc = self.model_config
        if adapter.max_rank > self.config.max_lora_rank:
            raise ValueError(
                f"adapter rank {adapter.max_rank} exceeds the server's max LoRA rank "
                f"{self.config.max_lora_rank} (--max-lora-rank)"
            )
        shapes = mc.linear_shapes()
        for (layer, module), w in adapter.modules.items():
            fin, fout = shapes[module]
            if layer >= mc.num_hidden_layers or w.a.shape[1] != fin or w.b.shape[0] != fout:
                raise ValueError(f"adapter weights for layer {layer} {module} do not fit the base model")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: LoraAdapter | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("inputs must not be empty")
        vocab = self.model.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"inputs holds token ids outside the vocabulary [0, {vocab})")
        cfg = self.config
        if len(ids) > cfg.max_input_length:
            raise ValueError(
                f"inputs has {len(ids)} tokens, more than max_input_length={cfg.max_input_length}"
            )
        if len(ids) + params.max_new_tokens > cfg.max_total_tokens:
            raise ValueError(
                f"inputs tokens + max_new_tokens must be <= max_total_tokens={cfg.max_total_tokens}"
                f" (got {len(ids)} + {params.max_new_tokens})"
            )
        if -(-(len(ids) + params.max_new_tokens) // cfg.block_size) > self.blocks.capacity:
            raise ValueError("request cannot fit in the KV cache even alone")
        if adapter is not None:
            self.check_adapter(adapter)
        speculator = self.speculators.for_request(adapter, params)
        rid = request_id or uuid.uuid4().hex
        if rid in self._seqs:
            raise ValueError(f"duplicate request id {rid!r}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(
            request_id=rid,
            prompt_ids=ids,
            params=params,
            adapter=adapter,
            seed=seed,
            generator=make_generator(seed, self.device) if params.do_sample else None,
            detok=IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=True),
            stop=StopChecker(params.stop) if params.stop else None,
            speculator=speculator,
        )
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    # ---- speculative decoding ---------------------------------------------------------------------
    def set_default_speculator(self, heads: MedusaHeads | None) -> None:
        """Medusa heads that draft for every request without heads of its own."""
        self.speculators.set_default(heads)

    @property
    def default_speculator(self) -> MedusaHeads | None:
        return self.speculators.default

    @property
    def speculative_tokens(self) -> int:
        return self.speculators.tokens

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- the step ------------------------------------------------------------------------------
    def _forward_batch(
        self, decodes: list[Sequence], prefills: list[Sequence]
    ) -> tuple[ForwardBatch, StepLayout]:
        mc = self.model_config
        return build_forward_batch(
            decodes,
            prefills,
            self.config.block_size,
            self.model.rotary,
            mc.num_attention_heads // mc.num_key_value_heads,
            self.device,
            kernels=self.kernels,
        )

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        fb, layout = self._forward_batch(sched.decodes, sched.prefills)
        hidden = self.model.forward(fb)
        rows = [r for rs in layout.logit_rows for r in rs]
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
        starts, offset = [], 0
        for rs in layout.logit_rows:
            starts.append(offset)
            offset += len(rs)
        # one cheap finiteness check for the whole step (a row's sum is NaN/inf iff an entry is);
        # a poisoned row fails alone
        bad = (~torch.isfinite(logits.sum(dim=-1))).tolist()
        bad_seq = [any(bad[starts[i] : starts[i] + len(rs)]) for i, rs in enumerate(layout.logit_rows)]
        plain = [i for i, seq in enumerate(layout.seqs) if not seq.drafts and not bad_seq[i]]
        result = None
        if plain:
            last = torch.tensor(
                [starts[i] + len(layout.logit_rows[i]) - 1 for i in plain], device=self.device
            )
            plain_logits = logits[last]
            marked = [j for j, i in enumerate(plain) if layout.seqs[i].params.watermark]
            if marked:
                prev = [layout.seqs[plain[j]].all_ids[-1] for j in marked]
                plain_logits = apply_watermark(plain_logits, marked, prev)
            result = sample(
                plain_logits,
                [
                    SamplingRow(
                        params=layout.seqs[i].params,
                        generator=layout.seqs[i].generator,
                        history=self._history(layout.seqs[i]),
                    )
                    for i in plain
                ],
            )
        plain_pos = {i: j for j, i in enumerate(plain)}
        self.steps += 1
        self.last_batch_size = len(layout.seqs)
        outputs: list[RequestOutput] = []
        draft_rows: list[tuple[Sequence, int]] = []  # hidden row of the last accepted position
        for i, seq in enumerate(layout.seqs):
            n = len(layout.logit_rows[i])
            seq_logits = logits[starts[i] : starts[i] + n]
            prefill = None
            if seq.params.prefill_logprobs and not seq.prefill_reported and not seq.drafts:
                prefill = self._prefill_infos(seq, seq_logits)
            if bad_seq[i]:
                outputs.append(
                    self._fail(
                        seq,
                        "generation failed: the model produced non-finite logits "
                        "for this request (check the adapter's weights)",
                    )
                )
                continue
            span_start, span_end = layout.spans[i]
            speculated = bool(seq.drafts)
            if speculated:
                v = verify_drafts(seq_logits, seq.drafts, seq.params, seq.generator)
                seq.num_cached += 1 + v.accepted_drafts
                seq.spec_steps += 1
                self.spec_steps += 1
                emitted = [(t, lp, None) for t, lp in zip(v.tokens, v.logprobs)]
                last_row = span_start + v.accepted_drafts
                seq.drafts = []
            else:
                j = plain_pos[i]
                alts = result.alternatives[j] if result.alternatives is not None else None
                emitted = [(int(result.token_ids[j]), float(result.logprobs[j]), alts)]
                seq.num_cached = seq.num_tokens
                last_row = span_end - 1
            out = self._emit(seq, emitted, prefill)
            if speculated:  # count what was emitted: EOS/stop/length may cut an accepted run short
                seq.spec_tokens += len(out.tokens)
                self.spec_tokens += len(out.tokens)
                out.spec_tokens = seq.spec_tokens
            outputs.append(out)
            if not out.finished:
                self.blocks.shrink(seq.block_table, seq.num_tokens)  # drop blocks of rejected drafts
                if seq.speculator is not None:
                    draft_rows.append((seq, last_row))
        if draft_rows:
            self.speculators.propose(hidden, draft_rows, self.model.lm_head, self.config.max_total_tokens)
        return outputs

    def _emit(
        self,
        seq: Sequence,
        emitted: list[tuple[int, float, list[tuple[int, float]] | None]],
        prefill: list[TokenInfo] | None,
    ) -> RequestOutput:
        """Append this step's tokens one by one, stopping at the first finish condition."""
        infos: list[TokenInfo] = []
        reason = None
        for token, logprob, alts in emitted:
            info, reason = self._append_token(seq, token, logprob, alts)
            infos.append(info)
            if reason is not None:
                break
        out = RequestOutput(
            request_id=seq.request_id,
            tokens=infos,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.output_ids),
            seed=seq.seed if seq.params.do_sample else None,
            prefill=prefill,
            spec_steps=seq.spec_steps,
            spec_tokens=seq.spec_tokens,
        )
        if reason is not None:
            self._finish(seq)
            out.finished, out.finish_reason, out.generated_text = True, reason, seq.text
        return out

    def _history(self, seq: Sequence) -> torch.Tensor | None:
        if seq.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(seq.all_ids, dtype=torch.long, device=self.device)

    def _prefill_infos(self, seq: Sequence, logits: torch.Tensor) -> list[TokenInfo]:
        seq.prefill_reported = True
        ids = seq.prompt_ids
        lp = torch.log_softmax(logits.float(), dim=-1)
        n = min(len(ids) - 1, lp.shape[0] - 1)
        nxt = torch.tensor(ids[1 : n + 1], device=lp.device)
        chosen = lp[torch.arange(n, device=lp.device), nxt].tolist() if n > 0 else []
        infos = [
            TokenInfo(
                id=ids[0],
                text=self.tokenizer.id_to_text(ids[0]),
                logprob=None,
                special=self.tokenizer.is_special(ids[0]),
            )
        ]
        for tid, lp_ in zip(ids[1 : n + 1], chosen):
            infos.append(
                TokenInfo(
                    id=tid,
                    text=self.tokenizer.id_to_text(tid),
                    logprob=lp_,
                    special=self.tokenizer.is_special(tid),
                )
            )
        return infos

    def _append_token(
        self, seq: Sequence, token: int, logprob: float, alts: list[tuple[int, float]] | None
    ) -> tuple[TokenInfo, str | None]:
        seq.output_ids.append(token)
        self.tokens_generated += 1
        special = self.tokenizer.is_special(token)
        delta = seq.detok.add(token)
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos_token:
            reason = "eos_token"
        elif (
            len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.config.max_total_tokens
        ):
            reason = "length"
        if reason is not None:
            delta += seq.detok.flush()  # bytes held back for an unfinished character
        seq.text += delta
        if seq.stop is not None and delta:
            cut = seq.stop.check(seq.text, len(delta))
            if cut is not None:
                delta = delta[: max(0, len(delta) - (len(seq.text) - cut))]
                seq.text = seq.text[:cut]
                reason = "stop_sequence"
        # special tokens (EOS) are streamed with their own text, as LoRAX does, but kept out of generated_text
        text = self.tokenizer.id_to_text(token) if special else delta
        info = TokenInfo(
            id=token,
            text=text,
            logprob=logprob,
            special=special,
            alternatives=[(t, self.tokenizer.id_to_text(t), lp) for t, lp in alts] if alts else None,
        )
        return info, reason

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """End one request with an error; the rest of the batch carries on.

        Its blocks may hold NaN/inf keys and values; they are zeroed before reuse
        because a masked-out position still multiplies its value by 0.
        """
        if seq.block_table:
            idx = torch.tensor(seq.block_table, device=self.device)
            for k, v in self.model.kv_caches:
                k[idx] = 0
                v[idx] = 0
        self._finish(seq)
        return RequestOutput(
            request_id=seq.request_id,
            tokens=[],
            finished=True,
            finish_reason="error",
            generated_text=seq.text,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.output_ids),
            error=message,
        )

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)

    # ---- offline batch API ----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[LoraAdapter | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; results in input order.

        Each result carries all generated tokens in `tokens`.
        """
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        alist = adapters or [None] * len(prompts)
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(prompts, plist, alist)]
        results: dict[str, RequestOutput] = {}
        tokens: dict[str, list[TokenInfo]] = {rid: [] for rid in ids}
        prefills: dict[str, list[TokenInfo] | None] = {}
        while len(results) < len(ids):
            for out in self.step():
                tokens[out.request_id].extend(out.tokens)
                if out.prefill is not None:
                    prefills[out.request_id] = out.prefill
                if out.finished:
                    results[out.request_id] = out
        final = []
        for rid in ids:
            r = results[rid]
            r.tokens, r.prefill = tokens[rid], prefills.get(rid)
            final.append(r)
        return final

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int], adapter: LoraAdapter | None = None) -> torch.Tensor:
        """Logits at every prompt position ([L, vocab]) for scoring and tests.

        Runs outside the step loop with its own blocks and slot reference, so it
        must not be called while another thread is stepping this engine.
        """
        if adapter is not None:
            self.check_adapter(adapter)
        seq = Sequence(
            request_id="__score__",
            prompt_ids=list(prompt_ids),
            params=SamplingParams(),
            adapter=adapter,
            seed=0,
            generator=None,
            detok=None,
            stop=None,
        )  # type: ignore[arg-type]
        if not self.blocks.can_hold(seq.block_table, seq.num_tokens):
            raise RuntimeError("not enough free KV blocks to score this prompt now")
        self.blocks.grow(seq.block_table, seq.num_tokens)
        try:
            if seq.uses_slot:
                seq.slot = self.slots.acquire(adapter)
            fb, _ = self._forward_batch([], [seq])
            return self.model.logits(self.model.forward(fb))
        finally:
            self.blocks.free(seq.block_table)
            if seq.slot is not None:
                self.slots.release(seq.slot)
