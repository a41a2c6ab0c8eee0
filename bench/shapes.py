"""Random-weight checkpoints with real-world shapes, random PEFT adapters and token-id prompts.

Benchmarks must not download weights, yet speed depends only on shapes, so we build
checkpoints with the exact shapes of popular small models from random weights and cache
them on disk. Every system under test then reads the same files and the same token ids.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "bench" / ".cache"
DEMO_MODEL = REPO_ROOT / "demo" / "model"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; prompts never use them
FIRST_PROMPT_ID = len(SPECIAL_TOKENS)

SHAPES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM-135M
    "smollm": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0: the ~1B shape (untied 32k vocabulary, 4 KV heads)
    "tinyllama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen05": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
}


def make_padded_tokenizer(out: Path, vocab_size: int, trained_vocab: int = 4096, seed: int = 0) -> None:
    """A byte-level BPE `tokenizer.json` whose vocabulary covers every id the model can emit.

    A real trained BPE keeps encode/decode realistic; the ids beyond what the small
    training corpus can justify are filled with unreachable placeholder tokens so that
    decoding any generated id works (random weights emit ids all over the vocabulary).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(200)) + " 0123456789 .,!?" for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(trained_vocab, vocab_size),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for i in range(next_id, vocab_size):
        vocab[f"<extra_{i}>"] = i
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def _is_complete_model(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def build_model(shape: str, cache_dir: Path = DEFAULT_CACHE, seed: int = 0) -> Path:
    """Return the checkpoint directory for `shape`, building it once into the cache."""
    if shape == "demo":
        if not _is_complete_model(DEMO_MODEL):
            raise FileNotFoundError(f"the demo model is missing at {DEMO_MODEL} (make demo-assets)")
        return DEMO_MODEL
    out = Path(cache_dir) / shape / "model"
    if _is_complete_model(out):
        return out
    cfg_kwargs = dict(SHAPES[shape])
    cfg_kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tmp = out.with_name("model.tmp")
    save_random_model(cfg_kwargs, tmp, seed)
    make_padded_tokenizer(tmp, cfg_kwargs["vocab_size"], seed=seed)
    tmp.rename(out)
    return out


def save_random_model(cfg_kwargs: dict, out: Path, seed: int = 0) -> None:
    """A model of `cfg_kwargs` (a SHAPES entry, ids and overrides added) with seeded random fp32
    weights, saved as safetensors to `out` (no tokenizer)."""
    import transformers

    kw = dict(cfg_kwargs)
    model_type, archs = kw.pop("model_type"), kw.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **kw)
    config.architectures = archs
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # std 0.02 like HF init, but biases too, so every tensor is non-trivial
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)


def adapter_dir(model_dir: Path, rank: int, index: int, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / "adapters" / _model_key(model_dir) / f"r{rank}" / f"a{index:04d}"


def _model_key(model_dir: Path) -> str:
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def build_adapters(
    model_dir: Path,
    rank: int,
    indices: list[int] | range,
    cache_dir: Path = DEFAULT_CACHE,
    target_modules: tuple[str, ...] = ALL_PROJECTIONS,
) -> list[Path]:
    """Random PEFT LoRA adapters (non-zero A and B), one directory per index, built once.

    Building a PEFT model per adapter would take seconds each; instead one PEFT model is
    built and its LoRA tensors re-randomised (seeded by the index) before every
    `save_pretrained`, so dozens of adapters take seconds and stay reproducible.
    """
    paths = [adapter_dir(model_dir, rank, i, cache_dir) for i in indices]
    missing = [
        (i, p) for i, p in zip(indices, paths, strict=True) if not (p / "adapter_model.safetensors").is_file()
    ]
    if not missing:
        return paths
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, cfg)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for index, path in missing:
        g = torch.Generator().manual_seed(1_000_003 * rank + index)
        with torch.no_grad():
            for p in lora_params:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(path)
    return paths


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(length)]


def main() -> None:
    ap = argparse.ArgumentParser(description="Build a benchmark checkpoint and adapters into the cache")
    ap.add_argument("--shape", default="smollm", choices=[*SHAPES, "demo"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--adapters", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    model = build_model(args.shape, args.cache)
    print(model)
    for p in build_adapters(model, args.rank, range(args.adapters), args.cache):
        print(p)


if __name__ == "__main__":
    main()
