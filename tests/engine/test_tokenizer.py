"""Our `tokenizers`-only wrapper must agree with `transformers.AutoTokenizer` on the same files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jinja2
import pytest

from loraserve.engine.tokenizer import Tokenizer
from tests.fixtures.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")

# Exercises the features real templates use: bos in context, raise_exception, namespace,
# loop controls, tojson, and generation prompts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}"
    "{% if message.get('meta') %} {{ message['meta'] | tojson }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    "{% if not ns.system %}{# no system prompt #}{% endif %}"
)

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "héllo wörld — ünïcode",
    "emoji 😀🎉 and 日本語のテキスト",
    "<s>special tokens inside</s> text <unk>",
    "numbers 0123456789 + - = ? ! , .",
    "",
    "\n\ttabs\nand newlines\n",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  hello 😀 "},
    {"role": "assistant", "content": "hi", "meta": {"a": "<é>"}},
    {"role": "user", "content": "add 2 + 2"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", "llama")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return d


def _variant(src: Path, dst: Path, **cfg_updates: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(cfg_updates)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _assert_same_encoding(ours: Tokenizer, hf) -> None:
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (
                text,
                add,
            )


def test_encode_matches_transformers(model_dir: Path) -> None:
    _assert_same_encoding(
        Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    )


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (True, True), (False, True)])
def test_add_bos_eos_flags_match_transformers(
    model_dir: Path, tmp_path: Path, add_bos: bool, add_eos: bool
) -> None:
    d = _variant(model_dir, tmp_path / "m", add_bos_token=add_bos, add_eos_token=add_eos)
    """transformers 5 ignores these flags when tokenizer.json exists; so must we."""
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    _assert_same_encoding(ours, hf)


def test_tokenizer_json_post_processor_is_kept(model_dir: Path, tmp_path: Path) -> None:
    """Llama-3 style: bos comes from tokenizer.json's TemplateProcessing, no add_bos_token flag."""
    d = _variant(model_dir, tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    _assert_same_encoding(ours, hf)
    assert ours.encode("hi")[0] == 1


def test_decode_matches_transformers(model_dir: Path) -> None:
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    samples = [ours.encode(t) for t in TEXTS]
    samples += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(50)]
    for ids in samples:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for i in range(ours.vocab_size):
        assert ours.id_to_text(i) == hf.decode([i])


def test_special_tokens_and_ids(model_dir: Path, tmp_path: Path) -> None:
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == set(hf.all_special_ids)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == {hf.eos_token_id} == {2}
    assert ours.vocab_size == len(hf)

    d = _variant(model_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_dir(d).eos_token_ids == {2, 7}


def test_missing_special_token_is_added_like_transformers(model_dir: Path, tmp_path: Path) -> None:
    d = _variant(
        model_dir, tmp_path / "m", pad_token={"content": "<pad>", "special": True, "__type": "AddedToken"}
    )
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    pad_id = hf.convert_tokens_to_ids("<pad>")
    assert ours.token_to_id("<pad>") == pad_id
    assert ours.is_special(pad_id)
    assert ours.encode("a <pad> b") == hf.encode("a <pad> b")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(model_dir: Path, add_generation_prompt: bool) -> None:
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.chat_template == CHAT_TEMPLATE
    for n in range(1, len(MESSAGES) + 1):
        expected = hf.apply_chat_template(
            MESSAGES[:n], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        got = ours.apply_chat_template(MESSAGES[:n], add_generation_prompt=add_generation_prompt)
        assert got == expected
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode(ours.apply_chat_template(MESSAGES), add_special_tokens=False) == list(ids)


def test_chat_template_from_jinja_file(model_dir: Path, tmp_path: Path) -> None:
    d = _variant(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_chat_template_errors_and_sandbox(model_dir: Path) -> None:
    ours = Tokenizer.from_dir(model_dir)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(MESSAGES, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(MESSAGES, chat_template="{% set ns = namespace(_x=1) %}")


def test_no_chat_template(model_dir: Path, tmp_path: Path) -> None:
    d = _variant(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_dir(d)
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)
