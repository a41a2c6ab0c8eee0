"""Turn chosen tokens into what the caller sees: token infos, incremental text, finish reasons.

Kept apart from the step so the step reads as a sequence of named stages, and so every way a
token can end a request (EOS, length, context, stop sequence) is decided in one place.
"""

from __future__ import annotations

import torch

from loraserve.engine.grammar import advance
from loraserve.engine.params import RequestOutput, TokenInfo
from loraserve.engine.sequence import Sequence
from loraserve.engine.tokenizer import Tokenizer

# (token, logprob, alternatives [(id, logprob)] or None, accepted from a speculative draft)
Emitted = tuple[int, float, list[tuple[int, float]] | None, bool]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_ids: set[int], max_total_tokens: int) -> None:
        self.tokenizer, self.eos_ids, self.max_total_tokens = tokenizer, eos_ids, max_total_tokens
        self.tokens_generated = 0

    def emit(self, seq: Sequence, emitted: list[Emitted], prefill: list[TokenInfo] | None) -> RequestOutput:
        """Append this step's tokens one by one, stopping at the first finish condition.
        The caller finishes the sequence when the output says `finished`."""
        infos: list[TokenInfo] = []
        reason = None
        for token, logprob, alts, skipped in emitted:
            info, reason = self._append_token(seq, token, logprob, alts)
            info.skipped = skipped
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
            out.finished, out.finish_reason, out.generated_text = True, reason, seq.text
        return out

    def failed(self, seq: Sequence, message: str) -> RequestOutput:
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

    def prefill_infos(self, seq: Sequence, logits: torch.Tensor) -> list[TokenInfo]:
        """Logprob of every prompt token given the ones before it (`decoder_input_details`)."""
        seq.prefill_reported = True
        ids, tok = seq.prompt_ids, self.tokenizer
        lp = torch.log_softmax(logits.float(), dim=-1)
        n = min(len(ids) - 1, lp.shape[0] - 1)
        nxt = torch.tensor(ids[1 : n + 1], device=lp.device)
        chosen = lp[torch.arange(n, device=lp.device), nxt].tolist() if n > 0 else []
        infos = [
            TokenInfo(id=ids[0], text=tok.id_to_text(ids[0]), logprob=None, special=tok.is_special(ids[0]))
        ]
        for tid, lp_ in zip(ids[1 : n + 1], chosen):
            infos.append(
                TokenInfo(id=tid, text=tok.id_to_text(tid), logprob=lp_, special=tok.is_special(tid))
            )
        return infos

    def _append_token(
        self, seq: Sequence, token: int, logprob: float, alts: list[tuple[int, float]] | None
    ) -> tuple[TokenInfo, str | None]:
        seq.output_ids.append(token)
        self.tokens_generated += 1
        if seq.grammar is not None:
            advance(seq.grammar, token)
        special = self.tokenizer.is_special(token)
        delta = seq.detok.add(token)
        reason = None
        if token in self.eos_ids and (not seq.params.ignore_eos_token or _grammar_done(seq)):
            reason = "eos_token"  # a complete grammar allows nothing but EOS: ignoring it would loop
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_total_tokens:
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


def _grammar_done(seq: Sequence) -> bool:
    return seq.grammar is not None and seq.grammar.is_stopped()
