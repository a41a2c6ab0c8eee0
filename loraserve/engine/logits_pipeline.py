"""The one per-row logits pipeline: every place that turns logits into a token goes through it.

An ordered list of processors, each applied to the whole batch with per-row
parameters (a row whose parameter is neutral is left as it is):

0. grammar mask       (structured output, engine/grammar.py: -inf outside the allowed tokens)
1. repetition penalty   (HF `RepetitionPenaltyLogitsProcessor`)
2. frequency and presence penalties (OpenAI's, over the generated tokens)
3. watermark            (TGI/LoRAX's green-list bias, engine/watermark.py)
4. temperature          (sampling rows only: greedy ignores it, as HF does)
5. top-k, top-p, typical-p: the *truncating* processors, sampling rows only

Plain sampling (engine/sampling.py) and speculative verification
(engine/speculative.py) both call `scores` (steps 1-4: what the reported
logprob is computed from) and `truncate` (step 5: what a token is drawn
from), so a constraint added here holds for drafted tokens too. Adding a
processor is one class in this file and one entry in `PROCESSORS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraserve.engine.grammar import apply_bitmask, fill_bitmask
from loraserve.engine.logits_processors import (
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
)
from loraserve.engine.params import SamplingParams
from loraserve.engine.watermark import apply_watermark


def is_sampling(params: SamplingParams) -> bool:
    """Temperature 0 means greedy even with do_sample (HF would reject it; clients send it)."""
    return params.do_sample and params.temperature > 0


@dataclass
class SamplingRow:
    """One position that needs a token this step."""

    params: SamplingParams
    generator: torch.Generator | None  # on the logits device; None = torch's default generator
    history: torch.Tensor | None  # prompt+generated ids on the logits device, for repetition_penalty
    prev_token: int | None = None  # the token before this position, for the watermark
    output: torch.Tensor | None = None  # ids generated so far, for frequency/presence penalties
    grammar: Any = None  # the sequence's llguidance LLMatcher, for structured output


class Processor:
    """Transforms the rows it is `active` for; `truncates` puts it after the logprob point."""

    truncates = False

    def active(self, row: SamplingRow) -> bool:
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """scores [len(rows), V] of the active rows only -> processed scores."""
        raise NotImplementedError


class GrammarMask(Processor):
    def active(self, row: SamplingRow) -> bool:
        return row.grammar is not None

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_bitmask(scores, fill_bitmask([r.grammar for r in rows], scores.shape[1]))


class RepetitionPenalty(Processor):
    def active(self, row: SamplingRow) -> bool:
        return row.params.repetition_penalty != 1.0 and row.history is not None and row.history.numel() > 0

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_repetition_penalty(
            scores, [r.params.repetition_penalty for r in rows], [r.history for r in rows]
        )  # type: ignore[misc]


class FrequencyPresence(Processor):
    def active(self, row: SamplingRow) -> bool:
        p = row.params
        return (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and row.output is not None

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_frequency_presence(
            scores,
            [r.params.frequency_penalty for r in rows],
            [r.params.presence_penalty for r in rows],
            [r.output for r in rows],  # type: ignore[misc]
        )


class Watermark(Processor):
    def active(self, row: SamplingRow) -> bool:
        return row.params.watermark and row.prev_token is not None

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_watermark(scores, list(range(len(rows))), [r.prev_token for r in rows])  # type: ignore[misc]


class Temperature(Processor):
    def active(self, row: SamplingRow) -> bool:
        return is_sampling(row.params) and row.params.temperature != 1.0

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_temperature(scores, [r.params.temperature for r in rows])


class TopK(Processor):
    truncates = True

    def active(self, row: SamplingRow) -> bool:
        return is_sampling(row.params) and row.params.top_k > 0

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_top_k(scores, [r.params.top_k for r in rows])


class TopP(Processor):
    truncates = True

    def active(self, row: SamplingRow) -> bool:
        return is_sampling(row.params) and row.params.top_p < 1.0

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_top_p(scores, [r.params.top_p for r in rows])


class TypicalP(Processor):
    truncates = True

    def active(self, row: SamplingRow) -> bool:
        return is_sampling(row.params) and row.params.typical_p < 1.0

    def __call__(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        return apply_typical_p(scores, [r.params.typical_p for r in rows])


PROCESSORS: tuple[Processor, ...] = (
    GrammarMask(),
    RepetitionPenalty(),
    FrequencyPresence(),
    Watermark(),
    Temperature(),
    TopK(),
    TopP(),
    TypicalP(),
)


def _run(scores: torch.Tensor, rows: Sequence[SamplingRow], truncating: bool) -> torch.Tensor:
    for proc in PROCESSORS:
        if proc.truncates != truncating:
            continue
        on = [i for i, r in enumerate(rows) if proc.active(r)]
        if not on:
            continue
        if len(on) == len(rows):
            scores = proc(scores, rows)
            continue
        idx = torch.tensor(on, device=scores.device)
        sub = proc(scores[idx], [rows[i] for i in on])
        scores = scores.clone()
        scores[idx] = sub
    return scores


def scores(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """float32 scores after every non-truncating processor: what logprobs are reported from."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows but {len(rows)} sampling rows")
    return _run(logits.float(), rows, truncating=False)


def truncate(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`scores` with every truncating processor applied (masked tokens at -inf): what tokens are
    drawn from."""
    return _run(scores, rows, truncating=True)


_PROBE_IDS = torch.zeros(1, dtype=torch.long)


def plain_rows(params: SamplingParams, grammar: Any = None) -> bool:
    """Whether every token of a request is the argmax of its raw logits or a draw from them at its
    temperature: no processor but the temperature could act on any of its rows (a probe row with
    a history, an output and a previous token asks each one) and no alternatives to report. Only
    such rows may decode several steps in one native call (engine/decode_bursts.py), with no
    Python between the steps: the call divides by the temperature and draws at the uniforms the
    row's generator gave it beforehand."""
    if params.top_n_alternatives > 0:
        return False
    probe = SamplingRow(params, None, _PROBE_IDS, prev_token=0, output=_PROBE_IDS, grammar=grammar)
    return not any(proc.active(probe) for proc in PROCESSORS if not isinstance(proc, Temperature))
