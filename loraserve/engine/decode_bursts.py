"""Decode bursts: several steps of the running batch in one native call.

Why: between two decode steps the engine's Python (scheduling, the step's small tensors,
sampling, emitting) runs cold after the weights streamed through every cache: ~1 ms a step at
batch 1 on SmolLM2-135M int8 (2-core AMD EPYC Zen 3, AVX2 only), ~10 % of the step at 20-25
GB/s and more where memory is faster. Where nothing but the chosen token links two steps, the
backend's decode stack runs a burst of them back to back (csrc/decode_steps_cpu.cpp) and Python
pays once a burst, as vLLM's multi-step scheduling does for its GPU steps. The tokens and
logprobs are the one-step path's, bit for bit (tests/engine/test_decode_bursts.py).

Which rows: greedy ones (the argmax), and rows sampled at a temperature with no truncation
(top-k, top-p, typical-p) and no other processor (engine/logits_pipeline.py `plain_rows`): the
OpenAI API's default request. A sampled row's uniforms are drawn before the burst from its
generator, step by step and row by row as the steps one at a time draw them
(model_runner.burst_draws), and the burst divides by the temperature and draws with the native
`draw_rows`, which the CPU backend's one-step sampling uses too (`Ops.draw`): a seeded request's
text does not depend on bursts.

When: a decode-only step (no prompt to admit or continue, and no request waiting, whose first
token a burst would delay), every sequence's rows plain (no alternatives, no grammar), none
drafting (Medusa verifies every step) nor owing prompt logprobs, and every block table able to
grow for the burst without preempting anyone. A burst stops at the nearest `max_new_tokens` or
context limit; a sequence that ends inside one (EOS, a stop sequence) drops the rest of it: at
most `steps - 1` steps spent for nothing, at the end of a request. Until the burst ends it stays
in the batch, so the others keep their batch's size: were one row left, the one-step path would
run the one-row kernels, whose sums round differently in the last bit from a block's.

How long: up to `--decode-steps` (default 4: ~0.74 ms of the ~0.88 ms a token spent outside the
model's native calls is gone, 8 takes ~0.07 ms more), and no longer than `BURST_SECONDS`, since a
burst's tokens stream out together: on a model whose step takes 50 ms, bursts would stream in
200 ms lumps for a 2 % gain, so it steps one at a time.
"""

from __future__ import annotations

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.logits_pipeline import plain_rows
from loraserve.engine.sequence import Sequence

BURST_SECONDS = 0.05  # the longest a burst may take, at the pace of the steps before it


class DecodeBursts:
    """The engine's burst policy: how many steps the next decode may run at once."""

    def __init__(self, max_steps: int) -> None:
        self.on = max_steps > 1  # off for good once the model says it cannot run bursts
        self.max_steps = max_steps
        self.token_seconds = 0.0  # a decode step's time, the last time one ran (0: none yet)

    def length(self, seqs: list[Sequence], waiting: bool, max_total_tokens: int, blocks: BlockManager) -> int:
        """Steps for this decode of `seqs` (1: an ordinary step; else the tables have grown)."""
        if not self.on or self.token_seconds <= 0:
            return 1
        cap = min(self.max_steps, int(BURST_SECONDS / self.token_seconds))
        return burst_length(seqs, cap, waiting, max_total_tokens, blocks)

    def took(self, seconds: float, steps: int) -> None:
        """A decode of `steps` steps (a burst, or 1) took `seconds`, Python around it included."""
        self.token_seconds = seconds / steps


def burst_length(
    seqs: list[Sequence], steps: int, waiting: bool, max_total_tokens: int, blocks: BlockManager
) -> int:
    """How many steps the decode step of `seqs` may run as one burst (1: an ordinary step); when
    more than 1, every block table has grown to hold the burst's positions."""
    if steps <= 1 or waiting or not seqs:
        return 1
    for seq in seqs:
        if seq.drafts or seq.speculator is not None or not plain_rows(seq.params, seq.grammar):
            return 1
        if seq.params.prefill_logprobs and not seq.prefill_reported:
            return 1
        steps = min(steps, seq.params.max_new_tokens - len(seq.output_ids), max_total_tokens - seq.num_tokens)
    if steps <= 1:
        return 1
    # the burst writes positions up to num_tokens + steps - 2: the tables must hold one fewer
    # than num_tokens + steps, all of them together
    need = sum(blocks.blocks_needed(seq.block_table, seq.num_tokens + steps - 1) for seq in seqs)
    if need > blocks.num_free:
        return 1
    for seq in seqs:
        blocks.grow(seq.block_table, seq.num_tokens + steps - 1)
    return steps
