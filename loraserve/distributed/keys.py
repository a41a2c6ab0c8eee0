"""Which adapter a request needs, as the key Ray Serve's model multiplexing routes on.

The ingress computes the key from the raw body to pick a replica; the replica computes the
same `AdapterRef` from the same body to load that adapter into its store before the app runs.
Both read the fields the single server reads (`parameters.adapter_id`/`adapter_source`/
`merged_adapters` on LoRAX routes, `model`/`adapter_source`/`merged_adapters` on `/v1/*`), so a
request is routed by exactly the adapter it will be served with.

Keys never hold a token, and ids of sources that authorise callers (`hub`, `pbase`) are hashed:
Ray exports multiplexed ids as metric labels and logs them, and a private adapter's name is the
caller's business. Tokens travel only inside the forwarded request. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.merge import BASE_MODEL_ADAPTER_ID, MergeError, MergeSpec

#: Sources whose ids stay readable in keys: they carry no per-caller authorisation.
_PUBLIC_SOURCES = frozenset({"local", "s3"})
#: Routes whose body names an adapter; every other request runs on any replica.
_LORAX_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/invocations"})
_OPENAI_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True, repr=False)
class AdapterRef:
    """The adapter a request asks for: `key` routes it; the rest lets a replica load it."""

    key: str
    adapter_id: str | None
    source: str | None  # as sent: None lets the replica apply its defaults and preloaded ids
    merge: MergeSpec | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"AdapterRef({self.key!r})"


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def _id_part(source: str, adapter_id: str) -> str:
    if source in _PUBLIC_SOURCES:
        return adapter_id
    return "sha256-" + hashlib.sha256(adapter_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def adapter_ref(
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    model_id: str,
    default_source: str,
) -> AdapterRef | None:
    """The adapter `body` names on `path`, or None for the base model, other routes and bodies
    the app will refuse anyway (it answers those with its usual 4xx wherever they run)."""
    if path not in _LORAX_ROUTES and path not in _OPENAI_ROUTES:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    if path in _OPENAI_ROUTES:
        params: dict[str, Any] = doc
        model = doc.get("model")
        adapter_id = model if isinstance(model, str) and model and model != model_id else None
    else:
        params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
        adapter_id = params.get("adapter_id") if isinstance(params.get("adapter_id"), str) else None
    sent = params.get("adapter_source")
    sent = sent if isinstance(sent, str) and sent.strip() else None
    source = sent.strip().lower() if sent else default_source
    token = params.get("api_token") if isinstance(params.get("api_token"), str) else None
    token = token or _bearer(headers)
    merged = params.get("merged_adapters")
    if merged is not None:
        try:
            spec = MergeSpec.from_request(merged)
        except MergeError:
            return None
        if spec.is_single and spec.ids[0] == BASE_MODEL_ADAPTER_ID:
            return None
        key = spec.cache_key([f"{source}:{_id_part(source, i)}" for i in spec.ids])
        return AdapterRef(key, None, sent, spec, token)
    if not adapter_id or not adapter_id.strip():
        return None
    return AdapterRef(f"{source}:{_id_part(source, adapter_id)}", adapter_id, sent, None, token)
