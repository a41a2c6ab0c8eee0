"""Where the base model comes from: `--model-id` (+ `--source`, `--revision`) -> a local directory.

* `local`: a directory in Hugging Face layout, used as is.
* `hub` (LoRAX's default): an existing local directory is still used as is (as LoRAX does); anything
  else is a repo id `org/name` fetched with `huggingface_hub.snapshot_download` into the Hugging
  Face cache (`HF_HUB_CACHE` / `HF_HOME`), at `--revision` (default `main`), from `HF_ENDPOINT`,
  with `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`); `HF_HUB_OFFLINE=1` uses the cache only. Only the
  files the server reads are downloaded: configs, tokenizer files, `*.safetensors` and their index.
  `s3://` ids are read from S3 whatever the source.
* `s3`: `s3://bucket/prefix`, through the same client as S3 adapters (standard AWS environment),
  into `<cache_dir>/s3/<digest of URI>-<digest of ETags>/`; a complete copy there is reused.

Every failure is a `ModelLoadError` naming what was tried and why it failed (the CLI prints it
and exits 2); tokens never appear in messages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import time
from pathlib import Path

from loraserve.models.config import ModelLoadError

log = logging.getLogger(__name__)

MODEL_SOURCES = ("hub", "local", "s3")
# What Engine.from_pretrained reads (models/config.py, models/weights.py, engine/tokenizer.py).
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
)
DEFAULT_MODEL_CACHE = "~/.cache/loraserve/models"


def wanted_files(names: list[str] | set[str]) -> list[str]:
    """The files of a listing the server needs (top level only: no subfolder variants)."""
    return sorted(
        n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in MODEL_FILE_PATTERNS)
    )


def _check_complete(names: list[str] | set[str], what: str) -> None:
    names = set(names)
    if "config.json" not in names:
        raise ModelLoadError(f"{what} has no config.json: it is not a Hugging Face model")
    if not any(n.endswith(".safetensors") for n in names):
        others = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf", ".ckpt")))
        found = f" (it has {', '.join(others[:4])})" if others else ""
        raise ModelLoadError(
            f"{what} has no *.safetensors weights{found}; only safetensors checkpoints are read"
        )


def resolve_model(
    model_id: str,
    source: str = "hub",
    revision: str | None = None,
    cache_dir: str | Path = DEFAULT_MODEL_CACHE,
    timeout_s: float | None = None,
    gguf_file: str | None = None,
) -> Path:
    """A local directory holding the base model named by `model_id` (see the module docstring);
    a `.gguf` file (or `gguf_file` inside a local directory or hub repo) becomes the directory
    models/gguf.py writes for it under `cache_dir`."""
    if gguf_file:
        from loraserve.models.gguf import gguf_model_dir

        if model_id.startswith("s3://") or source == "s3":
            raise ModelLoadError(
                "--gguf-file: GGUF checkpoints are read from a local directory or the hub, not S3"
            )
        local = Path(model_id).expanduser()
        if source == "local" or local.is_dir():
            return gguf_model_dir(local / gguf_file, Path(cache_dir))
        return gguf_model_dir(resolve_hub_file(model_id, gguf_file, revision), Path(cache_dir))
    if model_id.endswith(".gguf") and Path(model_id).expanduser().is_file():
        from loraserve.models.gguf import gguf_model_dir

        return gguf_model_dir(Path(model_id), Path(cache_dir))
    if not model_id:
        raise ModelLoadError("--model-id/--model (or MODEL_ID) is required")
    if source not in MODEL_SOURCES:
        raise ModelLoadError(
            f"--source {source}: unknown model source (use one of {', '.join(MODEL_SOURCES)})"
        )
    if model_id.startswith("s3://") or source == "s3":
        if revision:
            raise ModelLoadError(f"--revision {revision}: S3 models have no revisions; drop --revision")
        return resolve_s3(model_id, Path(cache_dir).expanduser(), timeout_s)
    local = Path(model_id).expanduser()
    if source == "local" or local.exists():
        if revision and source == "local":
            raise ModelLoadError(
                f"--revision {revision}: a local directory has no revisions; drop --revision"
            )
        if not local.is_dir():
            raise ModelLoadError(
                f"--model-id {model_id}: no such directory (--source local reads a local directory in "
                "Hugging Face layout: config.json, safetensors, tokenizer.json)"
            )
        return local
    # what can only be a path: say it is missing rather than that it is not a hub repo id
    if model_id.endswith(".gguf"):
        raise ModelLoadError(
            f"--model-id {model_id}: no such GGUF file (for a GGUF file in a hub repo, give the repo "
            "as --model-id and the file's name as --gguf-file)"
        )
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"--model-id {model_id}: no such local directory or file")
    try:
        return resolve_hub(model_id, revision)
    except ModelLoadError as e:
        if "repository not found" in str(e):  # maybe a mistyped local path
            raise ModelLoadError(f"{e}; nor is there a local directory {local}") from e
        raise


# ---- Hugging Face Hub --------------------------------------------------------------------------


def _hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_error(e: Exception, what: str, endpoint: str, had_token: bool) -> ModelLoadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from loraserve.adapters.sources.hub import _is_transport_error

    tried = f"tried {what} on the Hugging Face Hub ({endpoint})"
    if isinstance(e, HFValidationError):
        return ModelLoadError(
            f"--model-id {what.split('@')[0]}: not a local directory and not a valid hub repo id "
            f"(org/name): {e}"
        )
    if isinstance(e, LocalEntryNotFoundError) and _offline():
        return ModelLoadError(f"{tried}: offline (HF_HUB_OFFLINE=1) and it is not in the local cache")
    if _is_transport_error(e) or isinstance(e, LocalEntryNotFoundError):
        return ModelLoadError(
            f"{tried}: the hub could not be reached ({type(e).__name__}); check HF_ENDPOINT"
        )
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RevisionNotFoundError):
        return ModelLoadError(f"{tried}: revision not found (--revision)")
    if isinstance(e, GatedRepoError):
        return ModelLoadError(
            f"{tried}: the repo is gated; accept its terms on the hub and set HF_TOKEN to a token "
            "of an account with access"
        )
    if status == 401 and had_token:
        return ModelLoadError(f"{tried}: the token in HF_TOKEN was rejected, or it has no access to the repo")
    if isinstance(e, RepositoryNotFoundError) or status in (401, 404):
        hint = "" if had_token else " (a private repo needs HF_TOKEN set to a token with access)"
        return ModelLoadError(f"{tried}: repository not found or private{hint}")
    if status == 403:
        return ModelLoadError(f"{tried}: access denied for the token in HF_TOKEN")
    if status is not None:
        return ModelLoadError(f"{tried}: the hub answered HTTP {status}")
    return ModelLoadError(f"{tried}: {type(e).__name__}: {e}")


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) the serving files of a hub model repo."""
    from huggingface_hub import HfApi, snapshot_download

    from loraserve.adapters.sources.hub import DEFAULT_ENDPOINT, _env_cache_dir

    rev = revision or "main"
    what = f"{repo_id}@{rev}"
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache_dir = _env_cache_dir()
    token = _hub_token()
    offline = _offline()
    try:
        if not offline:
            info = HfApi(endpoint=endpoint).model_info(repo_id, revision=rev, token=token)
            names = [s.rfilename for s in (info.siblings or [])]
            _check_complete([n for n in names if "/" not in n], f"hub model {what}")
            log.info("downloading base model %s (%s) from %s into %s", what, info.sha, endpoint, cache_dir)
        t0 = time.monotonic()
        path = Path(
            snapshot_download(
                repo_id,
                revision=rev,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                allow_patterns=list(MODEL_FILE_PATTERNS),
                local_files_only=offline,
            )
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise _hub_error(e, what, endpoint, had_token=token is not None) from e
    names = [p.name for p in path.iterdir() if p.is_file()]
    _check_complete(names, f"hub model {what} (cached at {path})")
    log.info("base model %s ready at %s (%.2fs)", what, path, time.monotonic() - t0)
    return path


def resolve_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a hub repo (a GGUF checkpoint), downloaded or found in the cache."""
    from huggingface_hub import hf_hub_download

    from loraserve.adapters.sources.hub import DEFAULT_ENDPOINT, _env_cache_dir

    rev = revision or "main"
    what = f"{repo_id}@{rev}"
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = _hub_token()
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=rev,
                cache_dir=_env_cache_dir(),
                endpoint=endpoint,
                token=token,
                local_files_only=_offline(),
            )
        )
    except Exception as e:
        from huggingface_hub.errors import RemoteEntryNotFoundError

        if isinstance(e, RemoteEntryNotFoundError):
            raise ModelLoadError(
                f"tried {what} on the Hugging Face Hub ({endpoint}): it has no file {filename}"
            ) from e
        raise _hub_error(e, what, endpoint, had_token=token is not None) from e


# ---- S3 ----------------------------------------------------------------------------------------


def _s3_error(e: Exception, uri: str) -> ModelLoadError:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from loraserve.adapters.sources.s3 import _AUTH_CODES, _MISSING_CODES

    tried = f"tried {uri} on S3"
    if isinstance(e, NoCredentialsError):
        return ModelLoadError(f"{tried}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _AUTH_CODES:
            return ModelLoadError(f"{tried}: access denied by the S3 store ({code})")
        if code in _MISSING_CODES:
            return ModelLoadError(f"{tried}: not found ({code})")
        return ModelLoadError(f"{tried}: S3 error {code}")
    if isinstance(e, BotoCoreError):
        return ModelLoadError(
            f"{tried}: could not reach the S3 store ({type(e).__name__}); check AWS_ENDPOINT_URL"
        )
    return ModelLoadError(f"{tried}: {type(e).__name__}: {e}")


def resolve_s3(uri: str, cache_dir: Path, timeout_s: float | None = None) -> Path:
    """Download the serving files right under `s3://bucket/prefix` (or reuse a complete copy)."""
    from loraserve.adapters.errors import AdapterError
    from loraserve.adapters.sources.s3 import _s3_client, download_into, list_etags, parse_s3_uri

    uri = uri.rstrip("/")
    try:
        bucket, prefix = parse_s3_uri(uri)
    except AdapterError as e:
        raise ModelLoadError(f"--source s3: {str(e).replace('s3 adapter id', '--model-id')}") from e
    base = f"{prefix}/" if prefix else ""
    try:
        client = _s3_client(timeout_s)
        etags = list_etags(client, bucket, base, lambda name: bool(name) and "/" not in name)
        if not etags:
            raise ModelLoadError(f"tried {uri} on S3: not found (no objects under that prefix)")
        _check_complete(list(etags), f"s3 model {uri}")
        files = wanted_files(list(etags))
        digest = hashlib.sha256(";".join(f"{f}:{etags[f]}" for f in files).encode()).hexdigest()[:16]
        target = cache_dir / "s3" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{digest}"
        return download_into(client, bucket, base, files, target, f"base model {uri}")
    except ModelLoadError:
        raise
    except Exception as e:
        raise _s3_error(e, uri) from e
