"""GGUF checkpoints (llama.cpp's format), read with the `gguf` library.

`gguf_model_dir(path, cache_dir)` turns `model.gguf` into a small Hugging Face-layout directory:
`config.json` and `generation_config.json` from the GGUF metadata, `tokenizer.json` +
`tokenizer_config.json` rebuilt from its `tokenizer.ggml.*` vocabulary, and `gguf_checkpoint.json`
naming the GGUF file. No weights are copied: `models/weights.py` reads that pointer and gets the
tensors from `iter_gguf_weights`, one at a time, dequantised (F32, F16, BF16, Q8_0, Q5_0, Q5_1,
Q4_0, Q4_1, the K-quants Q4_K / Q5_K / Q6_K of llama.cpp's Q4_K_M and Q5_K_M mixes, ...:
whatever `gguf.quants.dequantize` knows; a llama-quantize Q4_K_M of SmolLM2-135M-Instruct loads
in ~6 s) and renamed to Hugging Face names, with the q/k projections un-permuted from
llama.cpp's rotary layout; the loader then casts to the serving dtype.

Supported: `general.architecture` llama (Llama, Mistral) and qwen2, with the tokenizers
`models/gguf_tokenizer.py` rebuilds (byte-level BPE and SentencePiece). Anything else is a
`ModelLoadError` saying what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from loraserve.models.config import ModelLoadError
from loraserve.models.gguf_tokenizer import gguf_tokenizer

log = logging.getLogger(__name__)

POINTER = "gguf_checkpoint.json"
READ_CHUNK_BYTES = 16 << 20  # fp32 rows dequantised at a time (_read_tensor)
# general.architecture -> (HF architecture, HF model_type, q/k stored permuted for llama.cpp's rope)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field this gguf version cannot decode: not one we read
            continue
    return out


def _hf_config(meta: dict, path: Path, tensor_names: set[str]) -> tuple[dict, dict]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(
            f"{path}: rope frequency factors (rope_freqs, Llama 3.1 scaling) are not supported yet"
        )
    hf_arch, model_type, _ = ARCHITECTURES[arch]

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len(tokens)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 2048),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "_name_or_path": str(path),
    }
    if cfg["vocab_size"] == 0:
        raise ModelLoadError(f"{path}: GGUF has no vocabulary size and no tokenizer.ggml.tokens")
    gen: dict = {}
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf_key] = gen[hf_key] = int(value)
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot != gen.get("eos_token_id"):
        gen["eos_token_id"] = [i for i in (gen.get("eos_token_id"), int(eot)) if i is not None]
    return cfg, gen


def gguf_model_dir(path: str | Path, cache_dir: str | Path) -> Path:
    """The Hugging Face-layout directory serving `path` (written once per GGUF file version)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"--model-id {path}: no such GGUF file")
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / "gguf" / f"{path.stem}-{key}"
    if (target / POINTER).is_file():
        return target
    t0 = time.monotonic()
    reader = _reader(path)
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    cfg, gen = _hf_config(meta, path, names)
    tokenizer_json, tokenizer_cfg = gguf_tokenizer(meta, path)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_cfg, indent=1))
    (tmp / POINTER).write_text(json.dumps({"gguf": str(path)}))
    if target.exists():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    log.info("GGUF %s (%s tensors) read in %.2fs", path, "/".join(types), time.monotonic() - t0)
    return target


def gguf_pointer(model_dir: Path) -> Path | None:
    """The GGUF file a directory written by `gguf_model_dir` serves, else None."""
    pointer = Path(model_dir) / POINTER
    if not pointer.is_file():
        return None
    return Path(json.loads(pointer.read_text())["gguf"])


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` (rows regrouped for llama.cpp's interleaved rope)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every GGUF tensor, dequantised one at a time."""
    for name, read in gguf_weight_readers(path).items():
        yield name, read()


def gguf_weight_readers(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Hugging Face name -> a reader of that tensor, dequantised to float32 (and un-permuted)
    when called; the names and types are checked here, before anything is read."""
    reader = _reader(path)
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported")
    permuted = ARCHITECTURES[arch][2]
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for t in reader.tensors:
        if t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        elif t.name.startswith("blk."):
            _, idx, part, suffix = t.name.split(".", 3)
            if part not in _LAYER_NAMES:
                raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name}")
            name = f"model.layers.{idx}.{_LAYER_NAMES[part]}.{suffix}"
        else:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name}")
        n_head = None
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            n_head = heads
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            n_head = kv_heads
        out[name] = partial(_read_tensor, path, t, n_head)
    return out


def _read_tensor(path: Path, t, n_head: int | None) -> torch.Tensor:
    """One tensor in fp32, dequantised READ_CHUNK_BYTES of rows at a time: gguf's numpy
    dequantisers make a few fp32 temporaries of what they are given, which for a whole 49k-row
    embedding doubled the load-time peak."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    rows, cols = math.prod(shape[:-1]), shape[-1]
    data = t.data.reshape(rows, -1)  # a row's elements, or its quantised blocks' bytes
    # a fresh array: an F32 tensor's data is a view of the read-only memory map
    arr = np.empty((rows, cols), dtype=np.float32)
    step = max(1, READ_CHUNK_BYTES // (cols * 4))
    try:
        for r0 in range(0, rows, step):
            arr[r0 : r0 + step] = dequantize(data[r0 : r0 + step], t.tensor_type).reshape(-1, cols)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, not supported"
        ) from e
    w = torch.from_numpy(arr.reshape(shape))
    return w if n_head is None else _unpermute(w, n_head)
