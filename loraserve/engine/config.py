"""Engine settings, and how memory budgets are read off the device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    quantize: str | None = None  # "int8" (or LoRAX's bitsandbytes/eetq): int8 weights (layers/precision.py)
    adapter_dtype: str | None = None  # LoRA slot table: float32 | bfloat16 (default: dtype)
    kv_cache_dtype: str | None = None  # auto | float32 | bfloat16 | float16 (layers/precision.py)
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # a KV byte budget to fill (default: from the workload)
    max_batch_total_tokens: int | None = None  # KV-cache capacity in tokens (engine/memory_plan.py)
    max_batch_prefill_tokens: int = 4096
    max_input_length: int | None = None  # default: min(1024, model context - 1)
    max_total_tokens: int | None = None  # default: min(2048, model context)
    max_num_seqs: int = 256
    max_active_adapters: int = 32
    max_lora_rank: int = 64
    speculative_tokens: int | None = None  # Medusa drafts per step; None = as many as the heads have
    adapter_cycle_time_s: float = 2.0  # how long requests may wait for a slot before busy adapters rotate out
    adapter_memory_bytes: int | None = None  # default: 10% of device memory
    num_threads: int | None = None  # CPU intra-op threads (default: torch's)
    pack_weights: bool = True  # CPU: keep dense weights packed, as panels or for oneDNN (layers/linear.py)
    # CPU fp32: GEMM, LoRA, decode attention, norm, SwiGLU, rotary kernels (layers/native_cpu.py)
    native_kernels: bool = True
    prefix_caching: bool = True  # reuse cached KV blocks of shared prompt prefixes (engine/block_manager.py)
    chunked_prefill: bool = False  # feed long prompts over several steps beside the decodes
    # prompt tokens per step when chunking (default: max_batch_prefill_tokens)
    prefill_chunk_tokens: int | None = None
    # decode steps (greedy, or sampled at a temperature alone) run back to back in one native call
    # where nothing else needs the step (engine/decode_bursts.py); 1: one step at a time
    decode_steps: int = 4
    grammar_backend: str = "llguidance"  # structured output: llguidance | xgrammar (engine/grammar.py)


def device_memory(device: torch.device) -> int:
    """Memory a budget may be carved from: free GPU memory, or on the host what the kernel says
    is *available* (MemAvailable: free pages plus reclaimable page cache). Plain free pages
    (SC_AVPHYS_PAGES) swing with whatever the page cache holds at start, so the same server got
    1 adapter slot one start and 64 the next."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
