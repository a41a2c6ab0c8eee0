"""Building the native CPU kernels: only `build-kernels` compiles, a start only loads (and says
in one line when it cannot), the cache key follows the sources, and a build killed halfway
leaves nothing that makes the next build or start wait."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraserve.layers import native_cpu
from tests.fixtures.native import AVX2, native_kernel_or_skip

REPO = Path(__file__).resolve().parents[2]
CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture
def fresh_load() -> Iterator[None]:
    """`_load` is cached per process: forget it around a test that changes the environment."""
    native_cpu._load.cache_clear()
    yield
    native_cpu._load.cache_clear()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (native_cpu.ENV_SWITCH, "CXX")}
    env.update(extra)
    return env


def _has_compiler() -> bool:
    return native_cpu.compiler() is not None


def test_cache_location_is_independent_of_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(native_cpu.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native_cpu.cache_dir() == tmp_path / "xdg" / "loraserve" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native_cpu.cache_dir() == Path.home() / ".cache" / "loraserve" / "kernels"
    monkeypatch.setenv(native_cpu.ENV_CACHE, str(tmp_path / "k"))
    assert native_cpu.cache_dir() == tmp_path / "k"
    assert native_cpu.library_path().parent == tmp_path / "k"


def test_build_key_follows_sources_headers_target_and_torch(tmp_path: Path) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(native_cpu.CSRC, csrc)
    key = native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2")
    assert key == native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2")
    assert key != native_cpu.build_key("native", csrc, "2.14.0", "flags: avx2")
    assert key != native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2 avx512f")
    assert key != native_cpu.build_key("x86-64-v3", csrc, "2.13.0", "flags: avx2")
    # a named target does not depend on the build machine's CPU, so a fleet can share it
    fleet = native_cpu.build_key("x86-64-v3", csrc, "2.13.0", "flags: avx2")
    assert fleet == native_cpu.build_key("x86-64-v3", csrc, "2.13.0", "flags: avx2 avx512f")
    header = next(iter(sorted(csrc.glob("*.h"))))
    header.write_text(header.read_text() + "\n// changed\n")
    assert key != native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2")
    edited = native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2")
    (csrc / "lora_cpu.cpp").write_text((csrc / "lora_cpu.cpp").read_text() + "\n// changed\n")
    assert edited != native_cpu.build_key("native", csrc, "2.13.0", "flags: avx2")


def test_builds_for_two_targets_sit_side_by_side_under_names_that_say_which() -> None:
    native, avx2 = native_cpu.module_name("native"), native_cpu.module_name(AVX2)
    assert native.startswith("loraserve_cpu_native_") and avx2.startswith("loraserve_cpu_x86_64_v3_")
    assert native.isidentifier() and avx2.isidentifier()  # Python module names
    assert native_cpu.library_path("native") != native_cpu.library_path(AVX2)


def test_each_build_uses_the_widest_vectors_its_target_has() -> None:
    """-march=native on this host compiles the AVX-512 paths where the CPU has AVX-512F, the AVX2
    ones where it has AVX2+FMA only; x86-64-v3 compiles the AVX2 ones on any host."""
    if native_cpu.target_march() != "native":
        pytest.skip(f"{native_cpu.ENV_MARCH} names another target")
    flags = set(native_cpu._cpu_features().split())
    want = 512 if "avx512f" in flags else 256 if {"avx2", "fma"} <= flags else 0
    assert native_kernel_or_skip().simd_bits() == want
    assert native_kernel_or_skip(AVX2).simd_bits() == 256


@pytest.mark.parametrize(
    ("march", "command"),
    [(None, "`loraserve build-kernels`"), (AVX2, f"`loraserve build-kernels --march {AVX2}`")],
)
def test_a_start_without_a_build_never_compiles_and_says_so_once(
    fresh_load: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    march: str | None,
    command: str,
) -> None:
    """The hint names the build the server looked for: the host's, or the one its environment picks."""
    cache = tmp_path / "kernels"
    monkeypatch.setenv(native_cpu.ENV_CACHE, str(cache))
    monkeypatch.delenv(native_cpu.ENV_SWITCH, raising=False)
    if march is None:
        monkeypatch.delenv(native_cpu.ENV_MARCH, raising=False)
    else:
        monkeypatch.setenv(native_cpu.ENV_MARCH, march)
    caplog.set_level(logging.INFO, logger=native_cpu.__name__)
    t0 = time.monotonic()
    assert native_cpu.cpu_kernels(CPU, F32) is None
    assert native_cpu.cpu_kernels(CPU, F32) is None  # asked again (another layer): no second line
    assert time.monotonic() - t0 < 5
    assert not cache.exists()  # nothing was built or even started
    lines = [r.getMessage() for r in caplog.records if r.name == native_cpu.__name__]
    assert len(lines) == 1, lines
    assert "not built" in lines[0] and "PyTorch fallbacks" in lines[0]
    assert command in lines[0] and str(cache) in lines[0]


def test_a_corrupt_library_is_reported_and_the_fallback_runs(
    fresh_load: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(native_cpu.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(native_cpu.ENV_SWITCH, raising=False)
    native_cpu.library_path().write_bytes(b"not an ELF file")
    caplog.set_level(logging.INFO, logger=native_cpu.__name__)
    assert native_cpu.cpu_kernels(CPU, F32) is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == native_cpu.__name__]
    assert "failed to load" in line and "build-kernels --force" in line


@pytest.mark.parametrize(
    "entry",
    [
        ["-m", "loraserve.cli", "build-kernels"],
        ["-m", "loraserve.cli", "build-kernels", "--march", AVX2],
        ["-m", "loraserve.layers.native_cpu", "--march", AVX2],
    ],
)
def test_build_without_a_compiler_exits_0_and_says_so(entry: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, *entry],
        env=_env(LORASERVE_KERNEL_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-c++")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "not built: no C++ compiler" in proc.stdout and "PyTorch fallbacks" in proc.stdout
    assert not list(tmp_path.glob("*.so"))


def test_build_when_switched_off_exits_0_and_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "build-kernels"],
        env=_env(LORASERVE_KERNEL_CACHE=str(tmp_path), LORASERVE_NATIVE_KERNELS="0"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0 and "disabled by LORASERVE_NATIVE_KERNELS=0" in proc.stdout


def test_build_kernels_after_make_install_finds_the_build_at_once() -> None:
    """`make install` has built them: running it again (as every `make install` does) only checks."""
    if not _has_compiler() or not native_cpu.enabled():
        pytest.skip("no C++ compiler or native kernels switched off: nothing was built")
    if not native_cpu.library_path().is_file():
        pytest.fail(f"no native kernels at {native_cpu.library_path()}: run `loraserve build-kernels`")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "build-kernels"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"already built for this machine: {native_cpu.library_path()}" in proc.stdout
    assert time.monotonic() - t0 < 60


def test_abandoned_build_dirs_are_removed_live_ones_kept(tmp_path: Path) -> None:
    import socket

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".build-{host}-{dead.pid}-abc123"
    live = tmp_path / f".build-{host}-{os.getpid()}-def456"
    other_host_old = tmp_path / ".build-elsewhere-1-ghi789"
    other_host_new = tmp_path / ".build-elsewhere-2-jkl012"
    for d in (killed, live, other_host_old, other_host_new):
        d.mkdir()
        (d / "lock").touch()  # what torch's build leaves when killed
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(other_host_old, (day_ago, day_ago))
    removed = native_cpu._remove_abandoned_builds(tmp_path)
    assert sorted(removed) == sorted([killed, other_host_old])
    assert live.exists() and other_host_new.exists()


TINY_EXTENSION = r"""
#include <Python.h>
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)
static PyModuleDef tiny = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
    PyObject* m = PyModule_Create(&tiny);
    if (m) PyModule_AddIntConstant(m, "answer", 42);
    return m;
}
"""
# A compiler that hangs in every compile step (not in torch's version probes) until released:
# the build it belongs to is then surely killed halfway.
HANGING_CXX = """#!/bin/sh
case " $* " in *" -c "*) ;; *) exec {real} "$@";; esac
touch {dir}/compiling
i=0
while [ ! -e {dir}/release ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
exit 1
"""
COMPILE = (
    "import sys; from pathlib import Path; from loraserve.layers.native_cpu import compile_into; "
    "compile_into(Path(sys.argv[1]), [Path(sys.argv[2])], ['-O0'], [])"
)


def _import(path: Path) -> int:
    return native_cpu._import_library(path).answer


@pytest.mark.timeout(300)
def test_a_build_killed_halfway_blocks_neither_the_next_build_nor_a_start(
    fresh_load: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGKILL a build while its compiler runs (torch's build `lock` is then held by nobody), then:
    a start returns at once without a library, and the next build finishes, cleans up and loads.
    The kernels' machinery with a one-file extension, so it takes seconds, not minutes."""
    real = native_cpu.compiler()
    if real is None:
        pytest.skip("no C++ compiler")
    tools = tmp_path / "tools"
    tools.mkdir()
    hanging = tools / "c++"
    hanging.write_text(HANGING_CXX.format(real=real, dir=tools))
    hanging.chmod(0o755)
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_EXTENSION)
    cache = tmp_path / "kernels"
    target = cache / f"{native_cpu.module_name()}.so"  # where a start looks for the kernels
    cmd = [sys.executable, "-c", COMPILE, str(target), str(source)]

    killed = subprocess.Popen(cmd, env=_env(CXX=str(hanging)), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tools / "compiling").exists():
            assert killed.poll() is None, "the build ended before it compiled"
            assert time.monotonic() < deadline, "the build never reached its compiler"
            time.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        (tools / "release").touch()  # the orphaned compiler steps exit too
    leftovers = list(cache.glob(".build-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "lock").exists(), "expected the killed build's lock"
    assert not target.exists()

    monkeypatch.setenv(native_cpu.ENV_CACHE, str(cache))
    monkeypatch.delenv(native_cpu.ENV_SWITCH, raising=False)
    t0 = time.monotonic()
    assert native_cpu.cpu_kernels(CPU, F32) is None  # a start: no wait, no partial library
    assert time.monotonic() - t0 < 5

    t0 = time.monotonic()
    again = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - t0 < 180
    assert _import(target) == 42
    assert not leftovers[0].exists() and not list(cache.glob(".build-*"))


@pytest.mark.timeout(300)
def test_concurrent_builds_both_finish_with_one_complete_library(tmp_path: Path) -> None:
    if native_cpu.compiler() is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_EXTENSION)
    target = tmp_path / "kernels" / "loraserve_concurrent_test.so"
    cmd = [sys.executable, "-c", COMPILE, str(target), str(source)]
    procs = [subprocess.Popen(cmd, env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    assert _import(target) == 42
    assert not list(target.parent.glob(".build-*"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    os.environ.get("LORASERVE_TEST_KERNEL_BUILD") != "1",
    reason="compiles the real kernels twice (minutes); LORASERVE_TEST_KERNEL_BUILD=1 runs it",
)
def test_killing_the_real_build_kernels_does_not_block_the_next(tmp_path: Path) -> None:
    """The same as above end to end: SIGKILL a real `build-kernels` while it compiles, then a start
    neither waits nor loads a partial library, and the next `build-kernels` finishes and loads."""
    if not _has_compiler() or not native_cpu.enabled():
        pytest.skip("no C++ compiler or native kernels switched off")
    cache = tmp_path / "kernels"
    env = _env(LORASERVE_KERNEL_CACHE=str(cache))
    cmd = [sys.executable, "-m", "loraserve.cli", "build-kernels"]
    first = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".build-*/*.o")) and not list(cache.glob(".build-*/lock")):
            assert first.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started compiling"
            time.sleep(0.2)
        time.sleep(3)  # well into compiling
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    leftovers = list(cache.glob(".build-*"))
    assert leftovers and list(cache.glob(".build-*/lock")), "expected the killed build's leftovers"
    assert not list(cache.glob("*.so"))

    probe = (
        "import time, torch; from loraserve.layers.native_cpu import cpu_kernels; t=time.monotonic(); "
        "m=cpu_kernels(torch.device('cpu'), torch.float32); "
        "print('LOADED' if m is not None else 'NONE', round(time.monotonic()-t, 2))"
    )
    start = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert start.returncode == 0 and start.stdout.startswith("NONE"), start.stdout + start.stderr
    assert "loraserve build-kernels" in start.stderr

    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr
    assert "native CPU kernels: built" in second.stdout, second.stdout + second.stderr
    assert not any(d.exists() for d in leftovers)  # the killed build's directory was cleaned up
    assert not list(cache.glob(".build-*"))
    assert len(list(cache.glob("*.so"))) == 1

    start = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert start.stdout.startswith("LOADED"), start.stdout + start.stderr


#: what marks a source whose code depends on the target's vector ISA
ISA_MARKS = ("simd.h", "widen.h", "__AVX", "_mm")


def test_every_vector_kernel_source_compiles_for_a_cpu_without_avx2() -> None:
    """The portable target (`--march x86-64`: SSE2 only, the fallback build for a CPU without
    AVX2) must still compile, though no machine of ours builds it: a constant or helper that
    lives inside one ISA's block broke it once unnoticed. A syntax-only pass of every source
    with the build's own flags and headers finds that without linking a library (the sources
    with vector code, i.e. those that ISA blocks can break; two minutes on 2 cores)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = native_cpu.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    flags = ["-std=c++17", "-fsyntax-only", "-march=x86-64", *native_cpu._CFLAGS, *includes]
    procs = [
        (
            src.name,
            subprocess.Popen([cxx, *flags, str(src)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        )
        for src in native_cpu.SOURCES
        if any(mark in src.read_text() for mark in ISA_MARKS)
    ]
    assert len(procs) >= 5, "the sources with vector code are the ones this test is for"
    failed = {}
    for name, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed[name] = out.decode(errors="replace")[-2000:]
    assert not failed, failed


def test_kernel_sources_include_the_light_torch_headers() -> None:
    """Parsing `torch/extension.h` (libtorch's whole C++ frontend) took 27 s per file,
    `torch/types.h` (every operator) 8 s and `csrc/aten_min.h` 3.4 s: 250-285 s a build on 2
    cores against 53-59. The binding files take torch's own `torch/csrc/utils/pybind.h`."""
    heavy = (
        "torch/extension.h",
        "torch/all.h",
        "torch/torch.h",
        "torch/python.h",
        "torch/types.h",
        "ATen/ATen.h",
    )
    files = sorted([*native_cpu.CSRC.glob("*.cpp"), *native_cpu.CSRC.glob("*.h")])
    assert files
    offenders = [f"{f.name}: {h}" for f in files for h in heavy if f"#include <{h}>" in f.read_text()]
    assert offenders == [], offenders
