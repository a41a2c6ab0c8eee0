"""Structured output: a per-request grammar (JSON schema or any JSON object) enforced with llguidance.

llguidance (https://github.com/guidance-ai/llguidance) compiles a JSON schema into a grammar
lazily (no per-schema compile step worth caching beyond the grammar text) and, for each step,
computes the set of allowed next tokens as a bitmask. Here:

- `GrammarCompiler` (one per engine) builds llguidance's tokenizer once from the model's
  `tokenizer.json`, sized to the logits' vocabulary (a padded `lm_head`'s extra ids are never
  allowed), turns a `ResponseFormat` into a grammar (bounded cache keyed by the schema text) and
  hands each constrained sequence its own `LLMatcher`. The schema is checked during request
  validation (server/validation.py, a worker thread) and the matcher built on the admission path
  (AsyncEngine.generate, a worker thread), so the step thread only advances matchers and fills
  masks. `--grammar-backend xgrammar` swaps in engine/grammar_xgrammar.py's compiler.
- The matcher advances on every token the sequence emits (engine/output_processor.py), drafts
  included; EOS is allowed only where the grammar may end, and once the grammar is complete EOS
  is the only allowed token.
- `fill_bitmask` + `apply_bitmask` fill one `[rows, ceil(V/32)]` int32 bitmask for the constrained
  rows and set every disallowed logit to -inf in one vectorised op: the first processor of the
  logits pipeline (engine/logits_pipeline.py), so greedy and sampled rows are both constrained.
- Medusa: `cut_drafts` keeps the prefix of a row's drafts the grammar accepts, `draft_masks` gives
  each verified position the mask after the drafts before it (the matcher is advanced, then
  rolled back), and accepted drafts advance the matcher like any emitted token.

JSON is generated compact (no free whitespace between tokens): a model that likes whitespace
would otherwise be free to emit it until `max_new_tokens`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch

from loraserve.engine.errors import RequestError
from loraserve.engine.params import ResponseFormat

if TYPE_CHECKING:
    from loraserve.engine.tokenizer import Tokenizer

#: JSON compile options: compact JSON, `", "` and `": "` separators as `json.dumps` writes them.
JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
log = logging.getLogger(__name__)
_CACHE_SIZE = 256
_BIT = torch.arange(32, dtype=torch.int32)


def schema_of(fmt: ResponseFormat) -> dict:
    """The JSON schema a response format stands for (`json_object` without schema: any object)."""
    return fmt.schema if fmt.schema is not None else {"type": "object"}


def grammar_text(fmt: ResponseFormat) -> str:
    """llguidance grammar for a response format; RequestError naming `response_format` if the
    schema is not one llguidance can enforce. Needs no tokenizer (usable in request validation)."""
    return _compiled(json.dumps(schema_of(fmt)))  # key order kept: it is the output's property order


_lock = threading.Lock()
_grammars: OrderedDict[str, str] = OrderedDict()


def _compiled(schema_text: str) -> str:
    with _lock:
        hit = _grammars.get(schema_text)
        if hit is not None:
            _grammars.move_to_end(schema_text)
            return hit
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise RequestError(f"response_format: invalid JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise RequestError(f"response_format: unsupported JSON schema: {messages[0] if messages else ''}")
    with _lock:
        _grammars[schema_text] = grammar
        while len(_grammars) > _CACHE_SIZE:
            _grammars.popitem(last=False)
    return grammar


class GrammarCompiler:
    """The engine's llguidance tokenizer (built on first use: ~1 s) and matcher factory."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Build the tokenizer on a background thread (llguidance releases the GIL), so the first
        structured request does not stall the step loop for it."""

        def build() -> None:
            try:
                _ = self.ll_tokenizer
            except RequestError as e:
                log.warning("%s", e)

        threading.Thread(target=build, name="llguidance-tokenizer", daemon=True).start()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                try:
                    self._ll = llguidance.LLTokenizer(
                        self._tokenizer.backend.to_str(),
                        n_vocab=self.vocab_size,
                        eos_token=self._eos or None,
                    )
                except Exception as e:  # a tokenizer llguidance cannot read: no structured output
                    raise RequestError(
                        f"response_format: structured output is unavailable for this model's tokenizer ({e})"
                    ) from None
            return self._ll

    def matcher(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar; RequestError if it cannot be built."""
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(fmt), log_level=0)
        if m.is_error():
            raise RequestError(f"response_format: {m.get_error()}")
        return m


def grammar_compiler(backend: str, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """The engine's matcher factory for `--grammar-backend`: llguidance (the default) or xgrammar
    (engine/grammar_xgrammar.py, an optional extra; README compares the two)."""
    if backend == "llguidance":
        return GrammarCompiler(tokenizer, vocab_size, eos_ids)
    if backend == "xgrammar":
        from loraserve.engine.grammar_xgrammar import XGrammarCompiler, require_xgrammar

        require_xgrammar()  # refused at start, not on the first structured request
        return XGrammarCompiler(tokenizer, vocab_size, eos_ids)
    raise ValueError(f"grammar backend must be llguidance or xgrammar, not {backend!r}")


def advance(matcher: llguidance.LLMatcher, token: int) -> None:
    """Feed one emitted token; a finished grammar ignores what follows (EOS after the end)."""
    if matcher.is_stopped():
        return
    matcher.consume_token(token)


def fill_bitmask(matchers: Sequence[llguidance.LLMatcher | torch.Tensor], vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(V/32)] int32: bit t of row r set iff token t is allowed for row r.
    An entry may be a row already computed (`draft_masks`). A matcher in error (it cannot be
    after masked decoding) leaves its row unconstrained."""
    words = (vocab_size + 31) // 32
    mask = _all_ones(len(matchers), words)
    for r, m in enumerate(matchers):
        if isinstance(m, torch.Tensor):
            mask[r] = m
        elif not m.is_error():
            m.unsafe_compute_mask_ptr(mask[r].data_ptr(), words * 4)
    return mask


def _all_ones(rows: int, words: int) -> torch.Tensor:
    """An all-allowed [rows, words] int32 mask, allocated by numpy: torch.full of a 32-row mask
    (49k ids) takes the OpenMP pool, ~25 ms median on this 2-core box when other work holds the
    cores, numpy ~6 us."""
    return torch.from_numpy(np.full((rows, words), -1, dtype=np.int32))


def cut_drafts(matcher: llguidance.LLMatcher, drafts: list[int]) -> list[int]:
    """The longest prefix of Medusa drafts the grammar accepts from the matcher's state."""
    if matcher.is_error():
        return []
    return drafts[: matcher.validate_tokens(drafts)] if drafts else drafts


def draft_masks(matcher: llguidance.LLMatcher, drafts: list[int], vocab_size: int) -> torch.Tensor:
    """[K+1, W] bitmasks for verifying [last, d_1..d_K]: row j is the mask after d_1..d_j (rows
    past the grammar's end stay all-ones: a request ends at its EOS). The matcher is advanced
    through the drafts (`cut_drafts` kept only ones it accepts) and rolled back."""
    words = (vocab_size + 31) // 32
    mask = _all_ones(len(drafts) + 1, words)
    consumed = 0
    for j in range(len(drafts) + 1):
        if matcher.is_error():
            break
        matcher.unsafe_compute_mask_ptr(mask[j].data_ptr(), words * 4)
        if j == len(drafts) or matcher.is_stopped() or not matcher.consume_token(drafts[j]):
            break
        consumed += 1
    if consumed:
        matcher.rollback(consumed)
    return mask


def apply_bitmask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every logit whose bit is clear set to -inf, in one op for the batch."""
    return scores.masked_fill(~allowed_tokens(mask, scores.shape[1], scores.device), float("-inf"))


def allowed_tokens(mask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, ceil(V/32)] int32 bitmask (on the CPU) -> [R, V] bool on `device`."""
    if device.type == "cpu":  # numpy unpacks bits ~20% faster than the shifts below
        unpacked = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(unpacked[:, :vocab_size].view(np.bool_))
    mask = mask.to(device, non_blocking=True)
    bits = (mask.unsqueeze(-1) >> _BIT.to(device)) & 1  # [R, W, 32]
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].bool()
