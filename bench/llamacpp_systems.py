"""The two servers of bench/llamacpp.py and the requests that time them.

Both systems get byte-identical work: the same token-id prompts, greedy, EOS ignored, a fixed
number of new tokens. Ours is a real `loraserve serve` process driven through its OpenAI
`/v1/completions` route (it takes token ids; the adapter is the `model`); llama.cpp is
`llama-server` driven through its native `/completion` route (token ids, per-request `lora`).
Times are taken by the client: decode rate = (tokens - 1) / (last chunk - first chunk) of one
streamed request, prompt rate = prompt tokens / time to the first chunk, throughput = all output
tokens / wall time of a concurrent batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.llamacpp_setup import LlamaCpp

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what the server logs when it has to run the PyTorch fallbacks (layers/native_cpu.py)
NO_KERNELS = "native CPU kernels are not built for this machine"


@dataclass
class Server:
    """A server process on a loopback port; `kind` is "ours" or "llama"."""

    name: str
    kind: str
    cmd: list[str]
    log: Path
    env: dict = field(default_factory=dict)
    lora_ids: dict[str, int] = field(default_factory=dict)  # adapter dir -> llama-server lora id
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, **self.env)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [*self.cmd, "--port", str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def wait(self, timeout: float = 600.0) -> str | None:
        """None once healthy, else why not (the end of its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                return " / ".join(tail) or "exited"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self._fallback_note()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"not healthy after {timeout:.0f} s"

    def _fallback_note(self) -> str | None:
        """Ours without its native kernels (none built for these sources, e.g. a kernel edited
        since the last `loraserve build-kernels`) serves the PyTorch fallbacks at a fraction of
        the speed: not a figure to publish, so the run reports ours as unavailable instead."""
        if self.kind == "ours" and NO_KERNELS in self.log.read_text(errors="replace"):
            return "no native CPU kernels for these sources: run `loraserve build-kernels` first"
        return None

    def rss_mb(self) -> dict[str, float]:
        """Current and peak resident memory of the process tree (MB)."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        cur = peak = 0.0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
            for p in procs:
                cur += p.memory_info().rss
                with open(f"/proc/{p.pid}/status") as fh:
                    hwm = next((ln for ln in fh if ln.startswith("VmHWM:")), "VmHWM: 0 kB")
                peak += int(hwm.split()[1]) * 1024
        except (psutil.Error, OSError):
            return {}
        return {"rss_mb": cur / 1e6, "peak_rss_mb": peak / 1e6}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ours_server(
    name: str, model: Path, threads: int, flags: list[str], adapters: list[Path], log_dir: Path
) -> Server:
    cmd = [sys.executable, "-m", "loraserve.cli", "serve", "--model-id", str(model)]
    cmd += ["--hostname", "127.0.0.1", "--num-threads", str(threads), "--max-batch-total-tokens", "8192"]
    # No prefix cache: llama-server runs without one too, and every prompt must be computed.
    cmd += ["--adapter-source", "local", "--max-concurrent-requests", "256", "--prefix-caching", "false"]
    cmd += flags
    if adapters:
        cmd += ["--preloaded-adapter-ids", *map(str, adapters)]
    return Server(name, "ours", cmd, log_dir / f"{name}.log", env={"OMP_NUM_THREADS": str(threads)})


def llama_server(
    name: str, llama: LlamaCpp, model: Path, threads: int, loras: dict[Path, Path], log_dir: Path
) -> Server:
    """32 slots with continuous batching, 8192 KV tokens (256 per slot), no prompt cache (ours has
    none); every adapter loaded with scale 0 so each request picks its own."""
    cmd = [llama.exe("llama-server"), "-m", str(model), "--host", "127.0.0.1", "-t", str(threads)]
    cmd += ["-tb", str(threads), "-np", "32", "-c", "8192", "-cb", "--cache-ram", "0", "--no-webui"]
    if not llama.repack_works(model):
        cmd += ["--no-repack"]
    if loras:
        cmd += ["--lora", ",".join(map(str, loras.values())), "--lora-init-without-apply"]
    ids = {str(a): i for i, a in enumerate(loras)}
    return Server(name, "llama", cmd, log_dir / f"{name}.log", lora_ids=ids)


# ---- requests ---------------------------------------------------------------------------------


def _body(server: Server, prompt: list[int], n: int, adapter: str | None, stream: bool) -> tuple[str, dict]:
    if server.kind == "ours":
        body = {"model": adapter or "", "prompt": prompt, "max_tokens": n, "temperature": 0}
        body.update(ignore_eos_token=True, stream=stream)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", body
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True}
    body.update(cache_prompt=False, stream=stream)
    if adapter is not None:
        body["lora"] = [{"id": server.lora_ids[adapter], "scale": 1.0}]
    return "/completion", body


@dataclass
class Stream:
    submit: float
    chunks: list[float]
    tokens: int

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.submit

    @property
    def decode_tok_s(self) -> float:
        span = self.chunks[-1] - self.chunks[0]
        return (self.tokens - 1) / span if span > 0 else float("nan")


async def stream_one(
    client: httpx.AsyncClient, server: Server, prompt: list[int], n: int, adapter: str | None = None
) -> Stream:
    """One streamed request: the arrival time of every chunk that carries text or a token."""
    path, body = _body(server, prompt, n, adapter, stream=True)
    chunks: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    async with client.stream("POST", server.url + path, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            ev = json.loads(line[6:])
            if server.kind == "ours":
                if ev.get("choices"):
                    chunks.append(now)
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
            else:
                if ev.get("content") or ev.get("tokens"):
                    chunks.append(now)
                if ev.get("stop"):
                    tokens = ev.get("tokens_predicted", tokens)
    return Stream(t0, chunks, tokens)


async def _complete(
    client: httpx.AsyncClient, server: Server, prompt: list[int], n: int, adapter: str | None
) -> int:
    path, body = _body(server, prompt, n, adapter, stream=False)
    resp = await client.post(server.url + path, json=body)
    resp.raise_for_status()
    out = resp.json()
    return out["usage"]["completion_tokens"] if server.kind == "ours" else out["tokens_predicted"]


async def concurrent(server: Server, prompts: list[list[int]], n: int, adapters: list[str | None]) -> dict:
    """All requests at once; output tok/s over the wall time of the whole batch."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(
            *(_complete(client, server, p, n, a) for p, a in zip(prompts, adapters, strict=True))
        )
        wall = time.perf_counter() - t0
    return {"tok_s": sum(done) / wall, "tokens": sum(done), "wall_s": wall}


async def single(server: Server, prompt: list[int], n: int, adapter: str | None = None) -> Stream:
    async with httpx.AsyncClient(timeout=3600) as client:
        return await stream_one(client, server, prompt, n, adapter)


def set_llama_global_scales_zero(server: Server) -> None:
    """Requests without `lora` would otherwise get every adapter at its global scale."""
    if server.lora_ids:
        body = [{"id": i, "scale": 0.0} for i in server.lora_ids.values()]
        httpx.post(server.url + "/lora-adapters", json=body, timeout=60).raise_for_status()


# ---- greedy tokens ----------------------------------------------------------------------------


def greedy_ids(server: Server, text: str, n: int, adapter: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy generated ids) for a text prompt, each server tokenising it itself."""
    if server.kind == "ours":
        toks = httpx.post(server.url + "/tokenize", json={"inputs": text}, timeout=60).json()
        params = {"max_new_tokens": n, "details": True}
        if adapter:
            params["adapter_id"] = adapter
        out = httpx.post(server.url + "/generate", json={"inputs": text, "parameters": params}, timeout=600)
        out.raise_for_status()
        return [t["id"] for t in toks], [t["id"] for t in out.json()["details"]["tokens"]]
    toks = httpx.post(server.url + "/tokenize", json={"content": text, "add_special": True}, timeout=60)
    # EOS not ignored: llama.cpp's ignore_eos masks EOS out while LoRAX's ignore_eos_token emits it
    # and goes on, so past a greedy EOS the two would differ by design, not by arithmetic.
    body = {"prompt": text, "n_predict": n, "temperature": 0, "top_k": 1}
    body.update(return_tokens=True, cache_prompt=False)
    if adapter:
        body["lora"] = [{"id": server.lora_ids[adapter], "scale": 1.0}]
    out = httpx.post(server.url + "/completion", json=body, timeout=600)
    out.raise_for_status()
    return toks.json()["tokens"], out.json()["tokens"]


# ---- llama-bench ------------------------------------------------------------------------------


def engine_decode(
    model: Path,
    threads: int,
    flags: tuple[str, ...],
    new_tokens: int,
    seed: int,
    prompt_tokens: int = 128,
    paired: int = 0,
) -> dict:
    """Our engine's batch-1 decode in a fresh process with no server (bench/engine_decode.py):
    the reading that compares with llama-bench's tg64; `paired` bursts read against a probe
    paired with each (its --paired-slices)."""
    cmd = [sys.executable, "-m", "bench.engine_decode", "--model", str(model), "--threads", str(threads)]
    cmd += [
        *flags,
        "--new-tokens",
        str(new_tokens),
        "--prompt-tokens",
        str(prompt_tokens),
        "--seed",
        str(seed),
        "--paired-slices",
        str(paired),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_bench(
    llama: LlamaCpp, model: Path, threads: list[int], reps: int = 3, depth: int = 0
) -> dict[tuple[str, int], float]:
    """{("pp128"|"tg64"|"tg64_d0", threads): tok/s} from one llama-bench invocation.

    tg64 runs at `depth` tokens of context (llama-bench `-d`), the context our decode reading has
    after its prompt, so both engines' attention reads the same cache; "tg64_d0" is llama-bench's
    usual empty-context figure beside it. pp128 is always from an empty context."""
    cmd = [llama.exe("llama-bench"), "-m", str(model), "-p", "128", "-n", "64"]
    cmd += ["-t", ",".join(map(str, threads)), "-r", str(reps), "-o", "json"]
    if depth:
        cmd += ["-d", f"0,{depth}"]
    if not llama.repack_works(model):
        cmd += ["--repack", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res: dict[tuple[str, int], float] = {}
    for row in json.loads(out):
        d, t = int(row.get("n_depth", 0)), int(row["n_threads"])
        if row["n_gen"] == 0:
            if d == 0:
                res[(f"pp{row['n_prompt']}", t)] = float(row["avg_ts"])
        elif d == depth:
            res[(f"tg{row['n_gen']}", t)] = float(row["avg_ts"])
        if row["n_gen"] and d == 0 and depth:
            res[(f"tg{row['n_gen']}_d0", t)] = float(row["avg_ts"])
    return res
