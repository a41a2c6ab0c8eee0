"""Streaming deltas must add up to a full decode, never showing half a character."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from loraserve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, decode_continuation
from loraserve.engine.tokenizer import Tokenizer
from tests.fixtures.tiny_models import _CORPUS, make_tokenizer

TEXTS = [
    "emoji 😀🎉👩‍👩‍👧 and more",
    "日本語のテキストと中文字符",
    "héllo wörld — ünïcode ✓",
    "the quick brown fox jumps over the lazy dog.",
    " leading space and  double  spaces ",
    "mixed: add 2 + 2 = 4 😀 ok 日本",
]


def make_sentencepiece_like(out: Path) -> None:
    """A Llama-2 style tokenizer: Metaspace, byte fallback, and a decoder that strips the first space."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        make_tokenizer(d)
    else:
        make_sentencepiece_like(d)
    return Tokenizer.from_dir(d)


def _stream(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool = False) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in gen]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


def test_multibyte_tokens_really_are_partial(tokenizer: Tokenizer) -> None:
    """Guard that the fixture exercises the hard case: single tokens decode to U+FFFD."""
    ids = tokenizer.encode("😀日本", add_special_tokens=False)
    assert len(ids) > 3
    assert any(REPLACEMENT_CHAR in tokenizer.id_to_text(i) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("hello world", add_special_tokens=False)
    gen = tokenizer.encode(text, add_special_tokens=False)
    deltas, full = _stream(tokenizer, prompt, gen)
    expected = tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)) :]
    assert full == expected
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert decode_continuation(tokenizer, prompt, gen) == expected


def test_sentencepiece_keeps_leading_space(tokenizer: Tokenizer) -> None:
    """The first generated word keeps its space even though decoding it alone strips it."""
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]) == "hello")
    prompt, gen = ids[:cut], ids[cut:]
    _, full = _stream(tokenizer, prompt, gen)
    assert full == " world"


def test_random_concatenations_of_texts(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(30):
        pieces = rng.choices(TEXTS + ["😀", "é", "日", " ", "a"], k=rng.randrange(1, 6))
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=True)
        gen = tokenizer.encode("".join(pieces), add_special_tokens=False)
        deltas, full = _stream(tokenizer, prompt, gen)
        assert full == tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)) :]
        assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_empty_prompt(tokenizer: Tokenizer) -> None:
    gen = tokenizer.encode("😀 hi 日本", add_special_tokens=False)
    _, full = _stream(tokenizer, [], gen)
    assert full == tokenizer.decode(gen)


def test_truncated_character_is_flushed(tokenizer: Tokenizer) -> None:
    """A generation cut inside a character still yields the bytes (as U+FFFD) at flush."""
    prompt = tokenizer.encode("hi", add_special_tokens=False)
    gen = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in gen]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert detok.pending_tokens > 0
    tail = detok.flush()
    assert REPLACEMENT_CHAR in tail
    assert detok.text == tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)) :]
    assert detok.flush() == ""


def test_special_tokens(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("hi", add_special_tokens=False)
    eos = tokenizer.token_to_id("</s>")
    gen = tokenizer.encode(" ok 😀", add_special_tokens=False) + [eos]
    _, shown = _stream(tokenizer, prompt, gen, skip=False)
    assert shown.endswith("</s>")
    _, skipped = _stream(tokenizer, prompt, gen, skip=True)
    assert "</s>" not in skipped and skipped == shown[: -len("</s>")]


def test_add_many_equals_add(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("hi", add_special_tokens=False)
    gen = tokenizer.encode(TEXTS[0] + TEXTS[1], add_special_tokens=False)
    one = IncrementalDetokenizer(tokenizer, prompt)
    many = IncrementalDetokenizer(tokenizer, prompt)
    for t in gen:
        one.add(t)
    for i in range(0, len(gen), 3):
        many.add_many(gen[i : i + 3])
    assert one.text + one.flush() == many.text + many.flush()


def test_long_generation_window_stays_small(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    gen = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    for t in gen:
        detok.add(t)
        assert len(detok._window) <= 16  # noqa: SLF001 - the memory bound is the point of the test
    assert detok.text + detok.flush() == tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)) :]
