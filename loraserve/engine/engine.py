"""The in-process engine: requests in, tokens out, one forward pass per step.

`Engine.step()` runs one iteration of continuous batching: schedule (decode
everyone running, admit new requests), one forward over all of their new
tokens — rows of many different adapters together — on the `ModelRunner`,
then choose tokens (sampling, or verifying Medusa drafts), emit them and
finish requests on EOS, length or stop sequences, freeing their blocks at
once. `AsyncEngine` (async_engine.py) drives this loop from a thread for
servers.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.lora_weights import LoraAdapter, MedusaHeads
from loraserve.engine.config import EngineConfig
from loraserve.engine.decode_bursts import DecodeBursts
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import cut_drafts, draft_masks, grammar_compiler
from loraserve.engine.memory_plan import Limits, resolve_lengths
from loraserve.engine.model_runner import ModelRunner, StepResult
from loraserve.engine.output_processor import Emitted, OutputProcessor
from loraserve.engine.params import RequestOutput, SamplingParams, TokenInfo
from loraserve.engine.sampling import SamplingRow, Stats, known_stats, make_generator, sample
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import Sequence
from loraserve.engine.speculative import verify_drafts
from loraserve.engine.speculators import Speculators
from loraserve.engine.step_observer import ForwardRecord, observed
from loraserve.engine.stop import StopChecker
from loraserve.engine.tokenizer import Tokenizer
from loraserve.host_allocator import keep_freed_memory
from loraserve.layers.precision import DTYPES
from loraserve.models.config import ModelConfig

log = logging.getLogger(__name__)


NON_FINITE = (
    "generation failed: the model produced non-finite logits for this request (check the adapter's weights)"
)


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        cfg = config or EngineConfig()
        self.config = cfg  # as given; what was resolved from it is `self.limits`
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
        max_input, max_total, max_prefill = resolve_lengths(cfg, mc)
        self.runner = ModelRunner(self.model_dir, mc, cfg, max_total, self.dtype, self.device)
        self.limits = Limits(
            max_input_length=max_input,
            max_total_tokens=max_total,
            max_batch_prefill_tokens=max_prefill,
            max_batch_total_tokens=self.runner.capacity_tokens,
            max_active_adapters=self.runner.lora.num_slots,
            max_lora_rank=cfg.max_lora_rank,
            max_num_seqs=cfg.max_num_seqs,
            block_size=cfg.block_size,
        )
        chunk = (cfg.prefill_chunk_tokens or max_prefill) if cfg.chunked_prefill else max_prefill
        self.scheduler = Scheduler(
            self.runner.blocks,
            self.runner.slots,
            cfg.max_num_seqs,
            chunk,
            cfg.adapter_cycle_time_s,
            prefix_caching=cfg.prefix_caching,
            chunked_prefill=cfg.chunked_prefill,
            context_cost=mc.attention_cost_context(),
        )
        self.outputs = OutputProcessor(self.tokenizer, self.eos_ids, max_total)
        self.speculators = Speculators(
            mc.hidden_size, self.runner.vocab_size, self.device, self.runner.dtype, cfg.speculative_tokens
        )
        self.grammars = grammar_compiler(
            cfg.grammar_backend, self.tokenizer, self.runner.vocab_size, sorted(self.eos_ids)
        )
        self.grammars.warm_up()
        self._seqs: dict[str, Sequence] = {}
        # called on the step thread after every forward pass, e.g. by the server's metrics
        self.step_observer: Callable[[ForwardRecord], None] | None = None
        self.spec_steps = 0
        self.spec_tokens = 0
        self.steps = 0
        self.last_batch_size = 0
        self.bursts = DecodeBursts(cfg.decode_steps)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig | None = None) -> Engine:
        return cls(model_dir, config)

    @property
    def ops_name(self) -> str:
        """The compute backend in use (layers/ops.py)."""
        return self.runner.ops.name

    @property
    def tokens_generated(self) -> int:
        return self.outputs.tokens_generated

    def stats(self) -> dict:
        """Counters for /metrics and /info; the only view of the engine's parts from outside."""
        blocks, slots = self.runner.blocks, self.runner.slots
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "free_blocks": blocks.num_free,
            "total_blocks": blocks.capacity,
            "active_adapters": len(slots.active_keys()),
            "adapter_slots": slots.num_slots,
            "adapter_slots_in_use": slots.in_use(),
            "adapter_loads": slots.loads,
            "adapter_evictions": slots.evictions,
            "tokens_generated": self.tokens_generated,
            "batch_size": self.last_batch_size,
            "steps": self.steps,
            "preemptions": self.scheduler.num_preemptions,
            "spec_steps": self.spec_steps,
            "spec_tokens": self.spec_tokens,
            "prefix_cache_hits": blocks.hits,  # blocks, not requests (block_manager.py)
            "prefix_cache_misses": blocks.misses,
            "prefix_cache_evictions": blocks.evictions,
            "prefix_cache_blocks": blocks.num_cached,
        }

    # ---- requests ------------------------------------------------------------------------------
    def check_adapter(self, adapter: LoraAdapter) -> None:
        """Refuse adapters the slot table cannot hold; whether they fit the model at all is
        adapters/validation.py's job, done before they get here."""
        if adapter.max_rank > self.limits.max_lora_rank:
            raise RequestError(
                f"adapter rank {adapter.max_rank} exceeds the server's max LoRA rank "
                f"{self.limits.max_lora_rank} (--max-lora-rank)"
            )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: LoraAdapter | None = None,
        request_id: str | None = None,
        grammar: Any = None,
    ) -> str:
        """Queue a request. `grammar`: its structured-output matcher built off the step loop
        (AsyncEngine builds it on a worker thread); None builds it here, for in-process callers."""
        params = params or SamplingParams()
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("inputs must not be empty")
        vocab = self.runner.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"inputs holds token ids outside the vocabulary [0, {vocab})")
        lim = self.limits
        if len(ids) > lim.max_input_length:
            raise RequestError(
                f"inputs has {len(ids)} tokens, more than max_input_length={lim.max_input_length}"
            )
        if len(ids) + params.max_new_tokens > lim.max_total_tokens:
            raise RequestError(
                f"inputs tokens + max_new_tokens must be <= max_total_tokens={lim.max_total_tokens}"
                f" (got {len(ids)} + {params.max_new_tokens})"
            )
        if -(-(len(ids) + params.max_new_tokens) // lim.block_size) > self.runner.blocks.capacity:
            raise RequestError("request cannot fit in the KV cache even alone")
        if adapter is not None:
            self.check_adapter(adapter)
        speculator = self.speculators.for_request(adapter, params)
        if grammar is None and params.response_format is not None:
            grammar = self.grammars.matcher(params.response_format)
        rid = request_id or uuid.uuid4().hex
        if rid in self._seqs:
            raise RequestError(f"duplicate request id {rid!r}")
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
            grammar=grammar,
        )
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    # ---- speculative decoding ---------------------------------------------------------------------
    def set_default_speculator(self, heads: MedusaHeads | None, cap: int | None = None) -> None:
        """Medusa heads that draft for every request without heads of its own; `cap`: drafts per
        step (None = as many as the heads have)."""
        self.speculators.set_default(heads, cap)

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
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, forward, choose tokens, emit them, draft the next ones."""
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        start = time.perf_counter()
        if not sched.prefills:
            steps = self.bursts.length(
                sched.decodes, bool(self.scheduler.waiting), self.limits.max_total_tokens, self.runner.blocks
            )
            burst = self._burst(sched.decodes, steps) if steps > 1 else None
            if burst is not None:
                self.bursts.took(time.perf_counter() - start, steps)
                return burst
        res = observed(
            self.step_observer,
            sched.decodes,
            sched.prefills,
            lambda: self.runner.execute(sched.decodes, sched.prefills),
        )
        # per logits row: first argmax, logsumexp, all finite; one pass that the NaN check and
        # (for rows no logits processor changes) sampling share
        stats = self.runner.ops.argmax_logsumexp(res.logits)
        poisoned = self._poisoned_rows(res, stats[2])
        sampled = self._sample_plain_rows(res, poisoned, stats)
        outputs, draft_rows = self._emit_step(res, poisoned, sampled, stats)
        if draft_rows:
            self.speculators.propose(
                res.hidden, draft_rows, self.runner.project_vocab, self.limits.max_total_tokens
            )
            for seq, _ in draft_rows:  # drafts the grammar rejects would only be rejected later
                if seq.grammar is not None:
                    seq.drafts = cut_drafts(seq.grammar, seq.drafts)
        self.steps += 1
        self.last_batch_size = len(res.layout.seqs)
        if not sched.prefills:
            self.bursts.took(time.perf_counter() - start, 1)
        return outputs

    def _burst(self, seqs: list[Sequence], steps: int) -> list[RequestOutput] | None:
        """`steps` steps of a decode batch in one call (engine/decode_bursts.py), each
        sequence's tokens emitted together; None (and no more bursts) where the model cannot."""
        rows = observed(self.step_observer, seqs, [], lambda: self.runner.run_burst(seqs, steps), steps)
        if rows is None:
            self.bursts.on = False
            return None
        outputs: list[RequestOutput] = []
        for seq, picks in zip(seqs, rows):
            if not all(finite for _, _, finite in picks):  # fails alone, as a poisoned step does
                outputs.append(self._fail(seq, NON_FINITE))
                continue
            out = self.outputs.emit(seq, [(tok, lp, None, False) for tok, lp, _ in picks], None)
            seq.num_cached = seq.num_tokens - 1  # the tokens it fed; any dropped by a stop are not its
            outputs.append(out)
            if out.finished:
                self._finish(seq)
            else:
                self.runner.blocks.shrink(seq.block_table, seq.num_tokens)
        self.steps += steps
        self.last_batch_size = len(seqs)
        return outputs

    def _poisoned_rows(self, res: StepResult, finite: torch.Tensor) -> list[bool]:
        """Per sequence: did any of its logits come out NaN/inf (`finite`: per logits row)? A
        poisoned sequence fails alone."""
        bad = (~finite).tolist()
        rows = res.layout.logit_rows
        return [any(bad[res.starts[i] : res.starts[i] + len(rs)]) for i, rs in enumerate(rows)]

    def _sample_plain_rows(self, res: StepResult, poisoned: list[bool], stats: Stats) -> dict[int, Emitted]:
        """One token for every healthy sequence without drafts, all rows in one pass."""
        seqs, rows = res.layout.seqs, res.layout.logit_rows
        plain = [i for i, seq in enumerate(seqs) if rows[i] and not seq.drafts and not poisoned[i]]
        if not plain:
            return {}
        last = [res.starts[i] + len(rows[i]) - 1 for i in plain]
        # every row, in order (a decode step): the logits and their stats as they are, no copy
        if last == list(range(res.logits.shape[0])):
            picked, picked_stats = res.logits, stats
        else:
            idx = torch.tensor(last, device=self.device)
            picked = res.logits.index_select(0, idx)
            arg, lse, finite = stats
            picked_stats = (arg.index_select(0, idx), lse.index_select(0, idx), finite.index_select(0, idx))
        row_stats = known_stats(picked, picked_stats, self.runner.ops.argmax_logsumexp)
        result = sample(picked, [self._sampling_row(seqs[i]) for i in plain], row_stats, self.runner.ops.draw)
        out: dict[int, Emitted] = {}
        token_ids, logprobs = result.token_ids.tolist(), result.logprobs.tolist()
        for j, i in enumerate(plain):
            alts = result.alternatives[j] if result.alternatives is not None else None
            out[i] = (token_ids[j], logprobs[j], alts, False)
        return out

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        history = None
        if p.repetition_penalty != 1.0:
            history = torch.tensor(seq.all_ids, dtype=torch.long, device=self.device)
        prev = (seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]) if p.watermark else None
        output = None
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            output = torch.tensor(seq.output_ids, dtype=torch.long, device=self.device)
        return SamplingRow(
            params=p,
            generator=seq.generator,
            history=history,
            prev_token=prev,
            output=output,
            grammar=seq.grammar,
        )

    def _emit_step(
        self,
        res: StepResult,
        poisoned: list[bool],
        sampled: dict[int, Emitted],
        stats: Stats,
    ) -> tuple[list[RequestOutput], list[tuple[Sequence, int]]]:
        """Outputs of every sequence, and (sequence, hidden row) of those that draft next.
        `stats`: the step's argmax / logsumexp / finite pass over every logits row."""
        outputs: list[RequestOutput] = []
        draft_rows: list[tuple[Sequence, int]] = []
        for i, seq in enumerate(res.layout.seqs):
            if seq.prefilling:  # a chunk of a prompt that continues next step: nothing to emit yet
                seq.num_cached = seq.prefill_end
                continue
            n = len(res.layout.logit_rows[i])
            a, b = res.starts[i], res.starts[i] + n  # this sequence's logits rows
            seq_logits = res.logits[a:b]
            prefill = None
            if seq.params.prefill_logprobs and not seq.prefill_reported and not seq.drafts:
                prefill = self.outputs.prefill_infos(seq, seq_logits)
            if poisoned[i]:
                outputs.append(self._fail(seq, NON_FINITE))
                continue
            span_start, span_end = res.layout.spans[i]
            speculated = bool(seq.drafts)
            if speculated:
                emitted, accepted = self._verify(
                    seq, seq_logits, (stats[0][a:b], stats[1][a:b], stats[2][a:b])
                )
                last_row = span_start + accepted
            else:
                emitted = [sampled[i]]
                seq.num_cached = seq.num_tokens
                last_row = span_end - 1
            out = self.outputs.emit(seq, emitted, prefill)
            if speculated:  # count what was emitted: EOS/stop/length may cut an accepted run short
                seq.spec_tokens += len(out.tokens)
                self.spec_tokens += len(out.tokens)
                out.spec_tokens = seq.spec_tokens
            outputs.append(out)
            if out.finished:
                self._finish(seq)
                continue
            self.runner.blocks.shrink(seq.block_table, seq.num_tokens)  # drop blocks of rejected drafts
            if seq.speculator is not None:
                draft_rows.append((seq, last_row))
        return outputs, draft_rows

    def _verify(self, seq: Sequence, logits: torch.Tensor, logits_stats: Stats) -> tuple[list[Emitted], int]:
        """Accept a prefix of the sequence's drafts (engine/speculative.py); returns the tokens to
        emit and how many drafts were accepted. `logits_stats`: `logits`' rows of the step's stats."""
        masks = None
        if seq.grammar is not None:  # each position's mask, from the matcher advanced through the drafts
            masks = draft_masks(seq.grammar, seq.drafts, self.runner.vocab_size)
        row_stats = known_stats(logits, logits_stats, self.runner.ops.argmax_logsumexp)
        v = verify_drafts(logits, seq.drafts, seq.params, seq.generator, masks, row_stats)
        seq.num_cached += 1 + v.accepted_drafts
        seq.spec_steps += 1
        self.spec_steps += 1
        seq.drafts = []
        alts = v.alternatives or [None] * len(v.tokens)
        # every token but the last was a draft the model accepted; the last one it chose itself
        skipped = [j < v.accepted_drafts for j in range(len(v.tokens))]
        return list(zip(v.tokens, v.logprobs, alts, skipped)), v.accepted_drafts

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """End one request with an error; the rest of the batch carries on. Its blocks may hold
        NaN/inf keys and values, so they leave the prefix cache and are zeroed before reuse."""
        self.runner.blocks.poison(seq.block_table)
        self._finish(seq)
        self.runner.zero_blocks(self.runner.blocks.take_dirty())
        return self.outputs.failed(seq, message)

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
            outs = self.step()
            lost = [rid for rid in ids if rid not in results and rid not in self._seqs]
            if not outs and lost:
                raise RuntimeError(f"request {lost[0]} vanished: is another thread stepping this engine?")
            for out in outs:
                if out.request_id not in tokens:  # a request someone else added: theirs to collect
                    continue
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
        blocks, slots = self.runner.blocks, self.runner.slots
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
        if not blocks.can_hold(seq.block_table, seq.num_tokens):
            raise RuntimeError("not enough free KV blocks to score this prompt now")
        blocks.grow(seq.block_table, seq.num_tokens)
        try:
            if seq.uses_slot:
                seq.slot = slots.acquire(adapter)
            return self.runner.all_logits(seq)
        finally:
            blocks.free(seq.block_table)
            if seq.slot is not None:
                slots.release(seq.slot)
