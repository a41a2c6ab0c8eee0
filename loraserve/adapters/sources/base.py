"""What every adapter source provides, and the errors they share.

A source turns a caller's `(adapter_id, token, revision)` into files on local
disk in two steps, because the two have different costs and cache rules:

* `resolve()` is cheap metadata work (one HTTP call at most). It pins the
  exact weights (`ResolvedAdapter.revision`: commit sha, S3 ETag digest, file
  fingerprint, Predibase path) and, for private sources, proves the token is
  allowed. The store repeats it for every request of an auth-checked source.
* `fetch()` downloads the files (or finds them in the disk cache) and returns
  the directory holding `adapter_config.json` + weights. It runs only when
  the parsed adapter is not already in host memory.

Both are blocking and are always called from a worker thread. Tokens are
never logged or put into error messages: errors name the adapter only.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.adapters.errors import AdapterError

LORA_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Medusa heads (alone, or beside a LoRA fine-tune that ships its own heads).
MEDUSA_FILES: tuple[str, ...] = ("config.json", "medusa_lm_head.safetensors", "medusa_lm_head.pt")
ADAPTER_FILES: tuple[str, ...] = LORA_FILES + MEDUSA_FILES


class AdapterUnavailableError(AdapterError):
    """The source could not be reached (network, storage outage): retrying later may work."""

    status_code = 503


def token_fingerprint(token: str | None) -> str | None:
    """Cache keys hold this digest, never the token, so a heap dump or log of keys leaks nothing."""
    if not token:
        return None
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter pinned to exact weights; `cache_key` names them in every cache tier."""

    source: str
    adapter_id: str
    revision: str
    location: str | None = None  # source-specific: S3 URI for s3/pbase, a directory for local
    private: bool | None = None  # None when the source cannot tell
    files: tuple[str, ...] = field(default=())  # adapter files the source listed, when it lists them
    requested_revision: str | None = None  # what the caller named (branch, tag), when it differs

    @property
    def cache_key(self) -> str:
        return f"{self.source}:{self.adapter_id}@{self.revision}"


class AdapterSource(ABC):
    """One place adapters come from (`hub`, `local`, `s3`, `pbase`)."""

    name: str = ""
    # True when a cached adapter must still be re-authorised per request (private repos).
    checks_auth: bool = False

    @abstractmethod
    def resolve(self, adapter_id: str, token: str | None, revision: str | None) -> ResolvedAdapter:
        """Pin the adapter's exact weights; raise `AdapterError` subclasses on failure."""

    @abstractmethod
    def fetch(self, resolved: ResolvedAdapter, token: str | None) -> Path:
        """Return a local directory holding the PEFT and/or Medusa files of `resolved`."""

    def cache_dirs(self) -> tuple[Path, ...]:
        """Directories this source downloads adapters into (the `cache_dir` attribute by default).

        The store refuses them as `local` paths: a private adapter downloaded once with a
        valid token must not be readable later without one.
        """
        cache_dir = getattr(self, "cache_dir", None)
        return (Path(cache_dir),) if cache_dir else ()

    def download(
        self, adapter_id: str, token: str | None = None, revision: str | None = None
    ) -> tuple[Path, str]:
        """Both steps at once, for callers that want files and do not cache (CLI, tests)."""
        resolved = self.resolve(adapter_id, token, revision)
        return self.fetch(resolved, token), resolved.revision


def pick_adapter_files(names: set[str] | list[str] | tuple[str, ...], where: str) -> list[str]:
    """The files to download: LoRA config plus one weights file, safetensors preferred like PEFT does,
    and Medusa's `config.json` plus heads when present (a Medusa adapter may have no LoRA part)."""
    names = set(names)
    medusa_weights = next((w for w in MEDUSA_FILES[1:] if w in names), None)
    medusa = ["config.json", medusa_weights] if medusa_weights and "config.json" in names else []
    if "adapter_config.json" not in names:
        if medusa:
            return medusa
        if medusa_weights:
            raise AdapterError(f"{where} has {medusa_weights} but no config.json naming its Medusa heads")
        raise AdapterError(
            f"{where} has no adapter_config.json: it is not a PEFT LoRA adapter "
            "(nor Medusa heads: config.json + medusa_lm_head.safetensors)"
        )
    for weights in ("adapter_model.safetensors", "adapter_model.bin"):
        if weights in names:
            return ["adapter_config.json", weights, *medusa]
    raise AdapterError(f"{where} has neither adapter_model.safetensors nor adapter_model.bin")
