"""The environment that holds one of our processes to what an AVX2-only CPU offers.

Both the kernel-build comparison (bench/kernel_builds.py) and the llama.cpp comparison
(bench/llamacpp.py --isa avx2) run ours "as on an AVX2 machine" on an AVX-512 host: our native
kernels from the `-march=x86-64-v3` build, and torch's own kernels (oneDNN, MKL, ATen's vectorised
ops) capped at AVX2, so no part of the run borrows this host's AVX-512. Set in the environment of
the subprocesses that run the engine; the variables must be there before they import torch.
"""

from __future__ import annotations

import os
import sys

from loraserve.layers.native_cpu import ENV_MARCH

AVX2_MARCH = "x86-64-v3"
AVX2_TORCH_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def avx2_env() -> dict[str, str]:
    """Our AVX2 build and torch held to AVX2."""
    return {ENV_MARCH: AVX2_MARCH, **AVX2_TORCH_ENV}


def reexec_as(isa: str, module: str) -> None:
    """With `isa` "avx2", run `python -m module` with this process's arguments again in the AVX2
    environment (torch reads it only at import, so the script starts over); returns where the
    environment is already the wanted one, or for the host's own ISA."""
    env = avx2_env()
    if isa == "avx2" and any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, **env})
