"""Native CPU kernels, compiled on first use for the machine they run on: the multi-LoRA op
(`csrc/lora_cpu.cpp`), decode attention over the paged KV cache
(`csrc/attention_cpu.cpp`), RMSNorm fused with the residual add
(`csrc/norm_cpu.cpp`), SwiGLU's silu*mul and rotary embedding as one pass
each (`csrc/activation_cpu.cpp`), and dense projections over panel-packed
weights (`csrc/gemm_cpu.cpp`, AVX-512 builds).

Why compile here instead of shipping a wheel: the kernels are a few dozen lines
of loops that only pay off when the compiler may use every vector instruction
the host has (`-march=native`), and they must match the exact torch build
installed. `torch.utils.cpp_extension` builds them once (40-60 s) into its
cache (`TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions`); every later
process loads the cached library in well under a second. The cache entry is
named after the CPU's feature flags and the torch version, so a home directory
shared by different machines never loads code built for another CPU, and a
torch upgrade rebuilds instead of loading a stale library.

Everything here is optional: with no compiler, a failed build, a non-CPU
device, a dtype other than float32, ``LORASERVE_NATIVE_KERNELS=0`` or
``serve --no-native-kernels``, callers get ``None`` and keep the pure-PyTorch
path (same results, slower). `make install` builds the kernels ahead of time
(``python -m loraserve.layers.native_cpu``) so a server's first start does not
pay for it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / f
    for f in (
        "lora_cpu.cpp",
        "attention_cpu.cpp",
        "norm_cpu.cpp",
        "activation_cpu.cpp",
        "gemm_cpu.cpp",
        "bindings.cpp",
    )
]
ENV_SWITCH = "LORASERVE_NATIVE_KERNELS"
# -march for the build: "native" by default; e.g. x86-64-v3 to build one library for a fleet of
# AVX2 machines (the kernels then take their portable paths instead of AVX-512)
ENV_MARCH = "LORASERVE_NATIVE_MARCH"


def _cpu_fingerprint(march: str) -> str:
    """Short hash of what the build depends on beyond its sources: the target (-march, and
    for "native" the CPU's feature flags), the torch build it links against, and the shared
    headers."""
    text = march + platform.machine() + platform.processor() + torch.__version__
    # torch's rebuild check hashes the .cpp sources only: fold the shared headers in here
    text += "".join(h.read_text() for h in sorted(CSRC.glob("*.h")))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _load() -> ModuleType | None:
    """Build (or load the cached build of) the extension; None when that is not possible."""
    if not enabled():
        log.info("native CPU kernels disabled by %s", ENV_SWITCH)
        return None
    t0 = time.perf_counter()
    march = os.environ.get(ENV_MARCH, "native").strip() or "native"
    try:
        from torch.utils.cpp_extension import load

        tag = _cpu_fingerprint(march)
        mod = load(
            name=f"loraserve_cpu_{tag}",
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler missing, unsupported flag, build error: all mean "use PyTorch"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("native CPU kernels unavailable (%s); using the PyTorch path", first[:300])
        return None
    log.info("native CPU kernels ready (%.1f s)", time.perf_counter() - t0)
    return mod


def cpu_kernels(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The module (`lora_rows`, `paged_decode_attention`, `rms_norm`, `add_rms_norm_`,
    `silu_mul`, `rotary`, `panel_linear`), when it can serve this device and dtype."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return _load()


def main() -> None:
    """Build ahead of time (used by `make install`); exits 0 either way: the kernels are optional."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = cpu_kernels(torch.device("cpu"), torch.float32) is not None
    print(f"native CPU kernels: {'ready' if ok else 'unavailable (PyTorch fallback)'}", file=sys.stderr)


if __name__ == "__main__":
    main()
