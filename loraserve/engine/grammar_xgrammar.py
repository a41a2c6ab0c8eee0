"""xgrammar as the structured-output backend, for comparison with llguidance (the default).

Issue 16 names xgrammar (https://github.com/mlc-ai/xgrammar) as the alternative to llguidance if
it proves better on the same benchmark; `bench/structured.py --backends llguidance,xgrammar`
measures both side by side, and README's structured-output section has the comparison. It is an
optional extra (`pip install -e '.[xgrammar]'`), not a dependency: on Linux x86_64 xgrammar
requires `triton` (a 286 MB wheel) for its CUDA mask kernel, which a CPU server never runs; the
package imports and runs on CPU without it.

`XGrammarCompiler` has `GrammarCompiler`'s interface (engine/grammar.py) and its matchers the
subset of llguidance's `LLMatcher` the engine uses (`consume_token`, `is_stopped`, `is_error`,
`unsafe_compute_mask_ptr`, `validate_tokens`, `rollback`), so `engine.grammars` can be swapped
and every path (mask, Medusa cut and per-position masks, EOS) runs unchanged. Differences that
matter: xgrammar compiles each new schema against the whole vocabulary (token masks precomputed
per grammar state; cached by schema text), llguidance compiles nothing up front and computes
masks lazily from its token trie.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loraserve.engine.errors import RequestError
from loraserve.engine.grammar import grammar_text, schema_of
from loraserve.engine.params import ResponseFormat

if TYPE_CHECKING:
    from loraserve.engine.tokenizer import Tokenizer

#: the same compact JSON llguidance generates (engine/grammar.py: JSON_OPTIONS)
SEPARATORS = (", ", ": ")


def require_xgrammar() -> None:
    """ValueError (a start-up error) when xgrammar is not installed."""
    try:
        _xgr()
    except RequestError as e:
        raise ValueError(str(e).removeprefix("response_format: ")) from None


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RequestError(
            "response_format: the xgrammar backend is not installed (pip install -e '.[xgrammar]')"
        ) from None
    return xgrammar


class XGrammarMatcher:
    """One request's xgrammar matcher behind the LLMatcher methods the engine calls."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._m, self._words, self._error = matcher, words, False

    def is_error(self) -> bool:
        return self._error

    def is_stopped(self) -> bool:
        return self._m.is_terminated()

    def consume_token(self, token: int) -> bool:
        ok = bool(self._m.accept_token(token))
        self._error |= not ok
        return ok

    def consume_tokens(self, tokens: Sequence[int]) -> bool:
        return all(self.consume_token(t) for t in tokens)

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar accepts in a row (state unchanged)."""
        n = 0
        for t in tokens:
            if self._m.is_terminated() or not self._m.accept_token(t):
                break
            n += 1
        if n:
            self._m.rollback(n)
        return n

    def rollback(self, n: int) -> None:
        self._m.rollback(n)

    def unsafe_compute_mask_ptr(self, ptr: int, nbytes: int) -> None:
        """Fill the `[1, words]` int32 row at `ptr` (a row of grammar.fill_bitmask's mask)."""
        row = np.ctypeslib.as_array((ctypes.c_int32 * self._words).from_address(ptr))
        self._m.fill_next_token_bitmask(torch.from_numpy(row).view(1, self._words), 0)


class XGrammarCompiler:
    """`GrammarCompiler` (engine/grammar.py) for xgrammar: tokenizer info built once, compiled
    grammars cached by schema text (xgrammar's own cache)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        threading.Thread(target=lambda: self.compiler, name="xgrammar-tokenizer", daemon=True).start()

    @property
    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                backend = self._tokenizer.backend
                vocab = backend.get_vocab(with_added_tokens=True)
                encoded = [""] * self.vocab_size
                for token, i in vocab.items():
                    if i < self.vocab_size:
                        encoded[i] = token
                meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
                info = xgr.TokenizerInfo(
                    encoded,
                    meta["vocab_type"],
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._eos or None,
                    add_prefix_space=meta["add_prefix_space"],
                )
                self._compiler = xgr.GrammarCompiler(info)  # its defaults: 8 threads, cache on
            return self._compiler

    def compile(self, fmt: ResponseFormat) -> Any:
        grammar_text(fmt)  # the same schema checks (and 422s) as with llguidance
        try:
            return self.compiler.compile_json_schema(
                json.dumps(schema_of(fmt)), any_whitespace=False, separators=SEPARATORS
            )
        except RuntimeError as e:
            raise RequestError(f"response_format: unsupported JSON schema: {e}") from None

    def matcher(self, fmt: ResponseFormat) -> XGrammarMatcher:
        xgr = _xgr()
        words = (self.vocab_size + 31) // 32
        return XGrammarMatcher(xgr.GrammarMatcher(self.compile(fmt)), words)
