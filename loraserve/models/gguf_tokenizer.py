"""Tokenizers of GGUF checkpoints, rebuilt from their `tokenizer.ggml.*` metadata.

A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary (tokens, token types,
BPE merges or SentencePiece scores) and the special ids as metadata and implements the algorithms
itself (llama-vocab.cpp). We rebuild the equivalent `tokenizers` pipeline rather than importing
transformers' GGUF converter, because transformers is not a serving dependency:

- `gpt2` (byte-level BPE: SmolLM2, Llama 3, Qwen2): the merges as stored, split first by the
  regexes llama.cpp applies for `tokenizer.ggml.pre` (`PRE_TOKENIZERS`), byte-level decoding;
- `llama` (SentencePiece BPE: Llama 2, Mistral 7B, TinyLlama, ...): no merges are stored, so
  they are recovered from the pieces' scores (a merge ranks by the score of the piece it makes,
  as SentencePiece applies them); spaces become "▁" with one prepended to the text (unless
  `tokenizer.ggml.add_space_prefix` is false) and characters outside the vocabulary fall back to
  its `<0xNN>` byte tokens, decoded back the same way.

Both are tested against transformers' own GGUF tokenizer loading (tests/models/test_gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from loraserve.models.config import ModelLoadError

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, in order (llama-vocab.cpp), before
# byte-level BPE; applied here as `tokenizers` Split pre-tokenizers (each refines the last's pieces).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
}


def gguf_tokenizer(meta: dict, path: Path) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) from the GGUF vocabulary."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, path, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer {kind!r} (tokenizer.ggml.model) is not supported yet "
            "(supported: gpt2 = byte-level BPE, llama = SentencePiece BPE)"
        )
    special = [t for t, ty in zip(tokens, types, strict=False) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    if kind == "gpt2":  # as before: byte-level vocabularies mark chat markers user-defined
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in user])
    else:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "unknown", "padding"):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None and 0 <= int(idx) < len(tokens):
            name = {"unknown": "unk", "padding": "pad"}.get(key, key)
            cfg[f"{name}_token"] = tokens[int(idx)]
    bos = cfg.get("bos_token")
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        cfg["chat_template"] = template
    return tok.to_str(), cfg


def _byte_level_bpe(meta: dict, path: Path, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported yet "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces of
    the vocabulary, best-scoring result first (ties: the longer left part, then vocabulary order,
    the order transformers' `generate_merges` gives, so both tokenize alike)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, int, int, int, str, str]] = []
    for pid, (piece, score) in enumerate(zip(tokens, scores, strict=True)):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-score, -len(left), -len(right), pid, vocab[left], vocab[right], left, right))
    found.sort(key=lambda m: m[:6])
    return [(m[6], m[7]) for m in found]


def _sentencepiece_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=sentencepiece_merges(tokens, scores),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok
