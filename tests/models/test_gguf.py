"""GGUF checkpoints: a tiny Llama written with the `gguf` library the way llama.cpp's converter writes
it (q/k permuted for its rope, tokenizer in the metadata), served by us and by `transformers`' own
GGUF loader; the logits agree for every tensor type we read. K-quants (llama.cpp's Q4_K_M / Q5_K_M
mixes) have no quantiser in `gguf`, so their tensors are random blocks with sane scales: both
loaders dequantise the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.models.config import ModelLoadError
from loraserve.models.source import resolve_model
from tests.fixtures.tiny_models import make_tiny_model

gguf = pytest.importorskip("gguf")

IDS = [1, 5, 9, 17, 33, 2, 8, 100, 250]
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
# K-quant blocks: where their fp16 super-block scales sit (d, and dmin where there is one) and a
# value for each that keeps the weights in the tiny model's range (|w| < 0.2)
KQUANT_SCALES = {"Q4_K": {0: 2e-4, 2: 1e-3}, "Q5_K": {0: 1e-4, 2: 1e-3}, "Q6_K": {208: 2e-5}}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_TOP["lm_head.weight"] = "output.weight"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary laid out as llama.cpp's converter writes Llama 2's: <unk>,
    <s>, </s>, the 256 byte tokens, then the learned pieces scored by merge order, padded to `size`."""
    from tokenizers import SentencePieceBPETokenizer

    words = ["hello", "world", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "the", "token"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + " 123 4.5!" for i in range(200)]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=size - 259 - 8, special_tokens=["<unk>", "<s>", "</s>"])
    learned = [
        t
        for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])
        if t not in ("<unk>", "<s>", "</s>")
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    pad = size - len(tokens)
    return tokens + [f"<pad{i}>" for i in range(pad)], scores + [-1e9] * pad, types + [4] * pad


def write_gguf(hf_dir: Path, out: Path, qtype: str, pre: str = "gpt-2", tokenizer: str = "gpt2") -> Path:
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    arch = cfg["model_type"]  # llama or qwen2; llama.cpp permutes q/k for llama only
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<pad{i}>" for i in range(len(tokens), cfg["vocab_size"])]
    special = {a["content"] for a in tok["added_tokens"]}
    if tokenizer == "llama":  # SentencePiece, as Llama 2 / Mistral / TinyLlama GGUFs ship
        tokens, scores, types = sentencepiece_vocab(cfg["vocab_size"])
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{idx}.{_LAYER[module]}.{suffix}"
        else:
            gname = _TOP[name]
        t = t.astype(np.float32)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            t = _permute(t, kv)
        if t.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, t)
        elif qtype in KQUANT_SCALES:
            w.add_tensor(gname, _random_kquant(t.shape, qtype, rng), raw_dtype=kind)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _random_kquant(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random `qtype` blocks for a [rows, cols] tensor (cols a multiple of 256), as raw bytes."""
    kind = gguf.GGMLQuantizationType[qtype]
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // per_block, block_bytes), dtype=np.uint8)
    for offset, value in KQUANT_SCALES[qtype].items():
        blocks[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # no llama3 rope scaling: llama.cpp stores it as a rope_freqs tensor, not read yet
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gguf"), "llama", rope_scaling=None)


def _ours(path: Path, cache: Path, dtype: str = "float32") -> torch.Tensor:
    model_dir = resolve_model(str(path), cache_dir=cache)
    engine = Engine.from_pretrained(model_dir, EngineConfig(dtype=dtype, kv_cache_memory_bytes=16 << 20))
    return engine.prompt_logits(IDS).float()


def _transformers(path: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_logits_match_transformers_gguf_loading(tiny, tmp_path: Path, qtype: str) -> None:
    path = write_gguf(tiny, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ours = _ours(path, tmp_path / "cache")
    torch.testing.assert_close(ours, _transformers(path), rtol=1e-4, atol=1e-4)
    if qtype == "F32":  # nothing lost: the safetensors checkpoint's logits
        dense = Engine.from_pretrained(tiny, EngineConfig(kv_cache_memory_bytes=16 << 20)).prompt_logits(IDS)
        torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", sorted(KQUANT_SCALES))
def test_kquant_gguf_logits_match_transformers_gguf_loading(tmp_path: Path, qtype: str) -> None:
    """Q4_K / Q5_K / Q6_K: what most GGUFs on the hub hold (Q4_K_M, Q5_K_M); rows of 256."""
    hf = make_tiny_model(
        tmp_path / "tiny256",
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        rope_scaling=None,
    )
    path = write_gguf(hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {qtype}
    ours = _ours(path, tmp_path / "cache")
    torch.testing.assert_close(ours, _transformers(path), rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.01  # logits that differ from token to token, not a flat row


def test_qwen2_gguf_with_biases_and_tied_embeddings(tmp_path: Path) -> None:
    hf = make_tiny_model(tmp_path / "qwen2", "qwen2")
    path = write_gguf(hf, tmp_path / "qwen2.gguf", "Q8_0")
    cfg = json.loads((resolve_model(str(path), cache_dir=tmp_path / "cache") / "config.json").read_text())
    assert (
        cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] and cfg["attention_bias"]
    )
    torch.testing.assert_close(_ours(path, tmp_path / "cache"), _transformers(path), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_gguf_tokenizer_and_config_come_from_the_metadata(tiny, tmp_path: Path, pre: str) -> None:
    from tokenizers import Tokenizer, pre_tokenizers

    path = write_gguf(tiny, tmp_path / "tiny.gguf", "Q8_0", pre=pre)
    model_dir = resolve_model(str(path), cache_dir=tmp_path / "cache")
    assert resolve_model(str(path), cache_dir=tmp_path / "cache") == model_dir  # written once
    assert not list(model_dir.glob("*.safetensors"))  # tensors stay in the GGUF file
    cfg = json.loads((model_dir / "config.json").read_text())
    ref = json.loads((tiny / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert cfg[key] == ref[key], key
    assert cfg["tie_word_embeddings"] is False and cfg["eos_token_id"] == 2
    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    if pre == "smollm":  # SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split
        theirs.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    texts = ("hello world", "the quick brown fox </s> jumps", "  ünïcode 12+30=? 2026\n\n  it's 42!")
    # the digit rule matters: "0123456789" is a few merged tokens for gpt-2, ten for smollm
    assert (len(ours.encode("0123456789").ids) == 10) == (pre == "smollm")
    for text in (*texts, "0123456789 and 12+30"):
        assert ours.encode(text).ids == theirs.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    engine = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
    assert 2 in engine.eos_ids and engine.tokenizer.encode("hello") == theirs.encode("hello").ids


def test_an_unknown_gguf_pre_tokenizer_is_refused(tiny, tmp_path: Path) -> None:
    path = write_gguf(tiny, tmp_path / "tiny.gguf", "F16", pre="made-up")
    with pytest.raises(ModelLoadError, match="GGUF pre-tokenizer 'made-up' .* is not supported yet"):
        resolve_model(str(path), cache_dir=tmp_path / "cache")


def test_gguf_in_a_directory_or_hub_repo_and_failures(tiny, tmp_path: Path, monkeypatch) -> None:
    from tests.fixtures.fake_hub import FakeHub, point_hf_at

    path = write_gguf(tiny, tmp_path / "tiny.gguf", "Q4_0")
    expected = _ours(path, tmp_path / "cache")
    model_dir = resolve_model(str(tmp_path), source="local", gguf_file="tiny.gguf", cache_dir=tmp_path / "c2")
    e = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
    torch.testing.assert_close(e.prompt_logits(IDS), expected, rtol=0, atol=0)
    hub = FakeHub().start()
    try:
        point_hf_at(monkeypatch, hub, tmp_path / "hf")
        hub.add_repo("org/tiny-GGUF", {"tiny.gguf": path.read_bytes(), "other.gguf": b"x"})
        model_dir = resolve_model("org/tiny-GGUF", gguf_file="tiny.gguf", cache_dir=tmp_path / "c3")
        assert hub.count("GET", "other.gguf") == 0
        e = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
        torch.testing.assert_close(e.prompt_logits(IDS), expected, rtol=0, atol=0)
        with pytest.raises(
            ModelLoadError, match="org/tiny-GGUF@main on the Hugging Face Hub .*: it has no file q.gguf"
        ):
            resolve_model("org/tiny-GGUF", gguf_file="q.gguf", cache_dir=tmp_path / "c3")
        with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
            resolve_model("org/tiny-GGUF", gguf_file="other.gguf", cache_dir=tmp_path / "c3")
    finally:
        hub.stop()
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        resolve_model(str(tmp_path), source="local", gguf_file="nope.gguf", cache_dir=tmp_path / "c4")


def test_generate_command_serves_a_gguf_file(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from loraserve.cli import main
    from loraserve.engine.params import SamplingParams

    path = write_gguf(tiny, tmp_path / "tiny.gguf", "Q8_0")
    cache = tmp_path / "cache"
    argv = ["generate", "--model", str(path), "--model-cache-dir", str(cache), "--max-new-tokens", "6"]
    assert main([*argv, "hello world"]) == 0
    engine = Engine.from_pretrained(
        resolve_model(str(path), cache_dir=cache), EngineConfig(max_batch_total_tokens=64)
    )
    expected = engine.generate(["hello world"], SamplingParams(max_new_tokens=6))[0].generated_text
    assert capsys.readouterr().out.rstrip("\n") == expected
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    assert (
        main(["generate", "--model", str(tmp_path / "broken.gguf"), "--model-cache-dir", str(cache), "x"])
        == 2
    )
    err = capsys.readouterr().err
    assert "broken.gguf is not a readable GGUF file" in err and "Traceback" not in err


def test_sentencepiece_gguf_tokenizer_matches_transformers(tiny, tmp_path: Path) -> None:
    """A `tokenizer.ggml.model` llama (SentencePiece BPE, no merges stored: they come from the
    scores) tokenizes exactly as transformers' GGUF loading does: BOS added, spaces as "▁",
    unknown characters as byte tokens, and decodes back to the text."""
    import transformers

    path = write_gguf(tiny, tmp_path / "spm.gguf", "F32", tokenizer="llama")
    model_dir = resolve_model(str(path), cache_dir=tmp_path / "cache")
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    engine = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
    texts = (
        "hello world",
        "the quick brown fox jumps over the lazy dog",
        "  two spaces, ünïcode ☃ and 12345.6!",
        "line one\nline two\ttab",
        "hellohello worldworld",
    )
    for text in texts:
        ids = engine.tokenizer.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1  # BOS: llama.cpp adds it to SentencePiece vocabularies by default
        assert engine.tokenizer.decode(ids[1:]) == theirs.decode(ids[1:])
        assert text.startswith(" ") or engine.tokenizer.decode(ids[1:]) == text
    assert len(engine.tokenizer.encode("hello world")) <= 4  # learned pieces, not characters
    assert "<0xE2>" in [theirs.convert_ids_to_tokens(i) for i in engine.tokenizer.encode("☃")]
    torch.testing.assert_close(_ours(path, tmp_path / "cache"), _transformers(path), rtol=1e-4, atol=1e-4)


def test_an_unknown_gguf_tokenizer_model_is_refused(tmp_path: Path) -> None:
    from loraserve.models.gguf_tokenizer import gguf_tokenizer

    with pytest.raises(ModelLoadError, match="GGUF tokenizer 'rwkv' .* is not supported yet"):
        gguf_tokenizer({"tokenizer.ggml.model": "rwkv"}, tmp_path / "x.gguf")


def test_gguf_tensors_are_read_as_the_model_packs_them(tiny, tmp_path: Path, monkeypatch) -> None:
    """Each tensor is read (dequantised) once, when the model builds the layer that needs it, not
    the whole checkpoint first (models/weights.py `LazyWeights`: reading everything before
    packing held a 1B model's weights in fp32 at once, 3.5 x what the server then keeps)."""
    from loraserve.models import gguf, llama

    path = write_gguf(tiny, tmp_path / "tiny-F32.gguf", "F32")
    events: list[tuple[str, str]] = []
    read, build = gguf._read_tensor, llama.build_projections

    def reading(p: Path, t, n_head: int | None) -> torch.Tensor:
        events.append(("read", t.name))
        return read(p, t, n_head)

    def building(projections, w, ops, table, layer: int):
        events.append(("build", f"blk.{layer}."))
        return build(projections, w, ops, table, layer)

    monkeypatch.setattr(gguf, "_read_tensor", reading)
    monkeypatch.setattr(llama, "build_projections", building)
    _ours(path, tmp_path / "cache")
    names = [n for kind, n in events if kind == "read"]
    assert len(names) == len(set(names)) == len(gguf._reader(path).tensors)  # each once
    builds = [i for i, (kind, _) in enumerate(events) if kind == "build"]
    assert len(builds) >= 2
    for before, b in zip(builds, builds[1:], strict=False):  # a layer is read after the one before is packed
        reads = [i for i, (kind, n) in enumerate(events) if kind == "read" and n.startswith(events[b][1])]
        assert reads and min(reads) > before
