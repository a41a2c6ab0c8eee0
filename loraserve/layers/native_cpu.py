"""Native CPU kernels, compiled ahead of time for the machine they run on: the multi-LoRA op
(`csrc/lora_cpu.cpp`), decode attention over the paged KV cache
(`csrc/attention_cpu.cpp`; its entry points and the KV writes in
`csrc/attention_entry_cpu.cpp`), causal attention of fresh prompts
(`csrc/prefill_attention_cpu.cpp`), RMSNorm fused with the residual add
(`csrc/norm_cpu.cpp`), SwiGLU's silu*mul and rotary embedding as one pass
each (`csrc/activation_cpu.cpp`), dense projections over panel-packed
weights (`csrc/gemm_cpu.cpp`; bf16 / int8 ones in `csrc/gemm_lowp_cpu.cpp`) and each with
its rows' own LoRA at decode sizes (`csrc/gemm_lora_cpu.cpp`, `csrc/gemm_lowp_lora_cpu.cpp`),
and a decode step's layer stack in one call (`csrc/decode_stack_cpu.cpp`).

Every kernel has an AVX-512 and an AVX2+FMA path (`csrc/simd.h`: one vector type, 16 or 8
floats), chosen when the library is compiled by its `-march`: `native` by default (whatever the
host has), or `LORASERVE_NATIVE_MARCH` / `build-kernels --march` (`x86-64-v3` or `haswell`: the
AVX2 build, also on an AVX-512 host, which is how it is tested and benchmarked here). A build with
neither keeps portable loops and oneDNN for projections.

Why compile on the host instead of shipping a wheel: the kernels are a few dozen lines
of loops that only pay off when the compiler may use every vector instruction
the host has (`-march=native`), and they must match the exact torch build installed.

Why a separate build step (`loraserve build-kernels`, run by `make install`) instead of
building on first use: a compile takes a minute or more, which must never land on a
server start or a request, and torch's own JIT cache keeps a `lock` file that a killed
build leaves behind, after which every later start waits on it forever without a word.
So the server only ever *loads* a finished library (`cpu_kernels`), and says in one log
line when there is none. The sources include only the slice of ATen they use
(`csrc/aten_min.h`; the two binding files torch's `<torch/csrc/utils/pybind.h>` beside it),
never `<torch/extension.h>`: parsing that one took 27 s per file, `<torch/types.h>` 8 s and
the slice 3.4 s, so a build on 2 cores (Zen 4) went from 250-285 s to 53-59 s.

The library is named after its target and a hash of everything that makes it valid here: the sources
and headers, the compile flags, the target (`-march`, and for `native` the CPU's feature
flags), the CPU architecture, the Python ABI and the torch version. It lives in
`$LORASERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/loraserve/kernels`, else
`~/.cache/loraserve/kernels`, so it does not depend on where the checkout is, a home
directory shared by different machines never loads code built for another CPU, and an
edited kernel or a torch upgrade asks for a rebuild instead of loading a stale library.

A build never holds a lock: each one compiles in its own fresh temporary directory in
the cache and renames the finished library into place (atomic on one filesystem). A
build killed halfway leaves only its private directory, which the next build removes;
two concurrent builds both finish and the last rename wins with an identical file.

Everything here is optional: with no compiler, a failed or missing build, a non-CPU
device, a dtype other than float32, ``LORASERVE_NATIVE_KERNELS=0`` or
``serve --no-native-kernels``, callers get ``None`` and keep the pure-PyTorch
path (same results, slower).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE_NAMES = (
    "lora_cpu.cpp",
    "attention_cpu.cpp",
    "attention_entry_cpu.cpp",
    "prefill_attention_cpu.cpp",
    "norm_cpu.cpp",
    "activation_cpu.cpp",
    "logits_cpu.cpp",
    "gemm_cpu.cpp",
    "gemm_lora_cpu.cpp",
    "gemm_lowp_cpu.cpp",
    "gemm_lowp_lora_cpu.cpp",
    "gemm_amx_cpu.cpp",
    "gemm_bf16dp_cpu.cpp",
    "gemm_int8dp_cpu.cpp",
    "embedding_cpu.cpp",
    "decode_stack_cpu.cpp",
    "decode_steps_cpu.cpp",
    "bindings.cpp",
)
SOURCES = [CSRC / f for f in SOURCE_NAMES]
ENV_SWITCH = "LORASERVE_NATIVE_KERNELS"
# -march for the build: "native" by default; e.g. x86-64-v3 to build one library for a fleet of
# AVX2 machines (the kernels then take their AVX2+FMA paths instead of AVX-512)
ENV_MARCH = "LORASERVE_NATIVE_MARCH"
ENV_CACHE = "LORASERVE_KERNEL_CACHE"
BUILD_COMMAND = "loraserve build-kernels"
MARCH_HELP = (
    f"Compile for this -march instead of ${ENV_MARCH} (default: native), e.g. x86-64-v3 for the AVX2 "
    f"build; servers load it when ${ENV_MARCH} names it."
)
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_BUILD_PREFIX = ".build-"
# A leftover build directory whose owner cannot be checked (another host) is removed after this long.
_STALE_BUILD_S = 24 * 3600


def env_on(name: str) -> bool:
    """An on/off switch from the environment: on unless set to 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    return env_on(ENV_SWITCH)


def target_march() -> str:
    return os.environ.get(ENV_MARCH, "native").strip() or "native"


def cache_dir() -> Path:
    """Outside the checkout on purpose: moving or re-cloning the repository keeps the build."""
    explicit = os.environ.get(ENV_CACHE, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "loraserve" / "kernels"


def _cpu_features() -> str:
    """What `-march=native` compiles for: the feature flags (and model) of this CPU."""
    text = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return text


def build_key(
    march: str,
    csrc: Path = CSRC,
    torch_version: str | None = None,
    cpu_features: str | None = None,
) -> str:
    """A library built under another key may be wrong here (other sources, CPU, flags, torch or
    Python ABI), so the key covers all of them; `cpu_features` only counts for -march=native,
    so a library built for a named target (x86-64-v3) can be shared by a fleet."""
    h = hashlib.sha256()

    def part(label: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        h.update(f"{label}:{len(raw)}:".encode())
        h.update(raw)

    for name in SOURCE_NAMES:
        part(name, (csrc / name).read_bytes())
    for header in sorted(csrc.glob("*.h")):
        part(header.name, header.read_bytes())
    part("cflags", " ".join((*_CFLAGS, f"-march={march}", "|", *_LDFLAGS)))
    part("machine", platform.machine())
    part("python", sys.implementation.cache_tag or "")
    part("torch", torch_version if torch_version is not None else torch.__version__)
    if march == "native":
        part("cpu", cpu_features if cpu_features is not None else _cpu_features())
    return h.hexdigest()[:16]


def module_name(march: str | None = None) -> str:
    """`loraserve_cpu_<march>_<key>`: builds for two targets (the host's AVX-512 and an AVX2 one)
    sit side by side in the cache, and a listing says which file is which."""
    march = march or target_march()
    tag = "".join(c if c.isalnum() else "_" for c in march)
    return f"loraserve_cpu_{tag}_{build_key(march)}"


def library_path(march: str | None = None) -> Path:
    return cache_dir() / f"{module_name(march)}.so"


def _import_library(path: Path) -> ModuleType:
    """torch must be imported first (it is, above): the library links against its symbols."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load(march: str) -> ModuleType | None:
    """Load the finished library for `march`, never build it: a start or a request must not
    wait minutes for a compiler (or forever on a lock). One log line says why when there is none."""
    if not enabled():
        log.info("native CPU kernels disabled by %s", ENV_SWITCH)
        return None
    path = library_path(march)
    if not path.is_file():
        log.warning(
            "native CPU kernels are not built for this machine, torch and source version (no %s); "
            "running the PyTorch fallbacks (same results, slower). Build them with `%s`.",
            path,
            BUILD_COMMAND if march == "native" else f"{BUILD_COMMAND} --march {march}",
        )
        return None
    try:
        mod = _import_library(path)
    except Exception as e:  # a corrupt file or a changed system library: the fallbacks still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(
            "native CPU kernels at %s failed to load (%s); running the PyTorch fallbacks. "
            "Rebuild them with `%s --force`.",
            path,
            first[:300],
            BUILD_COMMAND,
        )
        return None
    log.info("native CPU kernels loaded from %s (-march=%s, %s)", path, march, isa(mod))
    return mod


def isa(kernels: ModuleType) -> str:
    """What the library's vector code was compiled for (its -march decided): avx512, avx2 or portable."""
    bits = kernels.simd_bits()
    return {512: "avx512", 256: "avx2"}.get(bits, "portable")


def cpu_kernels(device: torch.device, dtype: torch.dtype, march: str | None = None) -> ModuleType | None:
    """The module (`lora_rows`, `paged_decode_attention`, `rms_norm`, `add_rms_norm_`,
    `silu_mul`, `rotary`, `panel_linear`), when it can serve this device and dtype and has been
    built (`loraserve build-kernels`) for `march`, by default the one `LORASERVE_NATIVE_MARCH` names
    (else native)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return _load(march or target_march())


@dataclass(frozen=True)
class BuildResult:
    status: str  # built | cached | disabled | no-compiler | failed
    path: Path
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("built", "cached")


def compiler() -> str | None:
    """The C++ compiler torch's build would call (it honours $CXX), if it exists."""
    return shutil.which(os.environ.get("CXX", "").strip() or "c++")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_abandoned_builds(cache: Path) -> list[Path]:
    """Directories of builds that were killed: their owner (on this host) is gone, or they are a
    day old (another host sharing the cache). A live build's directory is never touched."""
    removed = []
    host = socket.gethostname()
    for d in cache.glob(f"{_BUILD_PREFIX}*"):
        if not d.is_dir():
            continue
        parts = d.name[len(_BUILD_PREFIX) :].rsplit("-", 2)  # <host>-<pid>-<random>
        try:
            age = time.time() - d.stat().st_mtime
        except OSError:
            continue
        mine = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
        if (mine and not _pid_alive(int(parts[1]))) or age > _STALE_BUILD_S:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _with_ninja_on_path() -> None:
    """torch's build runs `ninja` from PATH; the pip-installed one sits next to this Python, which
    is not on PATH when the venv is not activated (`.venv/bin/loraserve build-kernels`)."""
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def build(force: bool = False, march: str | None = None) -> BuildResult:
    """Compile the kernels for `march` (default: `target_march()`) into the cache, unless that exact
    build is already there.

    A killed build leaves nothing that a later build or start waits on (see `compile_into`)."""
    march = march or target_march()
    target = library_path(march)
    if not enabled():
        return BuildResult("disabled", target, detail=f"{ENV_SWITCH}=0")
    if target.is_file() and not force:
        return BuildResult("cached", target)
    cxx = compiler()
    if cxx is None:
        wanted = os.environ.get("CXX", "").strip() or "c++"
        return BuildResult("no-compiler", target, detail=f"no C++ compiler ({wanted}) on PATH")
    t0 = time.perf_counter()
    try:
        compile_into(target, SOURCES, [*_CFLAGS, f"-march={march}"], _LDFLAGS)
    except Exception as e:  # compiler error, unsupported -march, missing ninja: kernels stay optional
        error_log = target.parent / f"{target.stem}.build-error.log"
        text = str(e) or type(e).__name__
        try:
            error_log.write_text(text)
        except OSError:
            error_log = None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "error" in ln.lower() and ln is not lines[0]), lines[0])
        detail = first[:300] + (f" (full output: {error_log})" if error_log else "")
        return BuildResult("failed", target, time.perf_counter() - t0, detail)
    return BuildResult("built", target, time.perf_counter() - t0)


def compile_into(
    target: Path, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]
) -> None:
    """Compile `sources` into the extension `target` (module name = its stem); raises on failure.

    The compile runs in a fresh private directory next to `target` and only the finished library,
    once it imports, is renamed onto `target`: whatever happens to this process, no later build
    waits on a lock of ours and no start loads half a file."""
    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(cache)
    _with_ninja_on_path()
    name = target.stem
    work = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=cache))
    try:
        from torch.utils.cpp_extension import load

        # load() also imports the result: a library that does not load is never put in the cache
        load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(work),
            verbose=False,
        )
        os.replace(work / f"{name}.so", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_command(force: bool = False, march: str | None = None) -> int:
    """`loraserve build-kernels`: always exits 0 (the kernels are optional and `make install` must
    not fail for want of a compiler), but always says what happened and what the server will run.
    `march` builds another target than `LORASERVE_NATIVE_MARCH` (a server loads it when that
    variable names it)."""
    march = march or target_march()
    target = library_path(march)
    if enabled() and (force or not target.is_file()) and compiler() is not None:
        print(
            f"building native CPU kernels (-march={march}, torch {torch.__version__}) into {target.parent}; "
            "this takes a minute or more...",
            flush=True,
        )
    result = build(force, march)
    fallback = "the server will run the PyTorch fallbacks (same results, slower)"
    if result.status == "built":
        print(f"native CPU kernels: built {result.path} in {result.seconds:.1f} s")
    elif result.status == "cached":
        print(f"native CPU kernels: already built for this machine: {result.path}")
    elif result.status == "disabled":
        print(f"native CPU kernels: disabled by {result.detail}; nothing built, {fallback}")
    elif result.status == "no-compiler":
        print(f"native CPU kernels: not built: {result.detail}; {fallback}")
    else:
        print(f"native CPU kernels: build FAILED after {result.seconds:.1f} s: {result.detail}; {fallback}")
    if result.ok and march != target_march():
        print(f"(a server loads this build when {ENV_MARCH}={march})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraserve.layers.native_cpu",
        description="Build the native CPU kernels for this machine (same as `loraserve build-kernels`).",
    )
    parser.add_argument(
        "--force", action="store_true", help="Rebuild even when a build for this machine is already cached."
    )
    parser.add_argument("--march", help=MARCH_HELP)
    args = parser.parse_args(argv)
    return build_command(args.force, args.march)


if __name__ == "__main__":
    sys.exit(main())
