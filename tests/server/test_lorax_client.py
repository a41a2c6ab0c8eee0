"""The real `lorax-client` 0.6.3 (in its own venv, see `make lorax-client`) against our server."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import ServerProcess

LORAX_PYTHON = os.environ.get("LORAX_CLIENT_PYTHON") or str(
    Path(__file__).resolve().parents[2] / ".venv-lorax" / "bin" / "python"
)
pytestmark = pytest.mark.skipif(
    not Path(LORAX_PYTHON).is_file(),
    reason=f"lorax-client venv not found at {LORAX_PYTHON}: run `make lorax-client` or set LORAX_CLIENT_PYTHON",
)

PRELUDE = """
import json, sys
from lorax import Client
from lorax import errors
url = sys.argv[1]
adapters = json.loads(sys.argv[2])
client = Client(url, timeout=60)
out = {}
def expect_error(name, fn):
    try:
        fn()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
"""


def run_client(server: ServerProcess, body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    adapters = json.dumps({k: str(v) for k, v in server.adapters.items()})
    proc = subprocess.run(
        [LORAX_PYTHON, "-c", script, server.url, adapters], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http_generate(server: ServerProcess, **params) -> dict:
    r = httpx.post(server.url + "/generate", json={"inputs": "hello world", "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_and_stream_match_the_rest_api(server: ServerProcess) -> None:
    out = run_client(
        server,
        """
        r = client.generate("hello world", max_new_tokens=6)
        out["text"] = r.generated_text
        out["details"] = r.details.model_dump(mode="json")
        r = client.generate("hello world", max_new_tokens=6, adapter_id=adapters["alpha"], adapter_source="local",
                            decoder_input_details=True, return_k_alternatives=2)
        out["alpha"] = r.generated_text
        out["alpha_prefill"] = len(r.details.prefill)
        out["alpha_alts"] = [len(t.alternative_tokens) for t in r.details.tokens]
        events = list(client.generate_stream("hello world", max_new_tokens=6, adapter_id=adapters["beta"],
                                             adapter_source="local"))
        out["stream_ids"] = [e.token.id for e in events]
        out["stream_text"] = events[-1].generated_text
        out["stream_details"] = events[-1].details.model_dump(mode="json")
        r = client.generate("hello world", max_new_tokens=5, best_of=2, do_sample=True)
        out["best_of"] = len(r.details.best_of_sequences)
        r = client.generate("hello world", max_new_tokens=4, return_full_text=True)
        out["full"] = r.generated_text
    """,
    )
    base = http_generate(server, max_new_tokens=6, details=True)
    assert out["text"] == base["generated_text"]
    # the 0.6.3 client's Token has no `skipped` (0.7's field): it drops it, as it drops any unknown field
    known = [{k: v for k, v in t.items() if k != "skipped"} for t in base["details"]["tokens"]]
    assert out["details"]["tokens"] == [{**t, "alternative_tokens": None} for t in known]
    alpha = http_generate(server, max_new_tokens=6, adapter_id=str(server.adapters["alpha"]))
    assert (
        out["alpha"] == alpha["generated_text"] and out["alpha_prefill"] > 0 and out["alpha_alts"] == [2] * 6
    )
    beta = http_generate(
        server,
        max_new_tokens=6,
        details=True,
        adapter_id=str(server.adapters["beta"]),
        adapter_source="local",
    )
    assert out["stream_ids"] == [t["id"] for t in beta["details"]["tokens"]]
    assert out["stream_text"] == beta["generated_text"]
    assert (
        out["stream_details"]["generated_tokens"] == 6 and out["stream_details"]["finish_reason"] == "length"
    )
    assert out["best_of"] == 1
    assert out["full"].startswith("hello world")


def test_error_types_map_to_lorax_exceptions(server: ServerProcess) -> None:
    out = run_client(
        server,
        """
        # a rule only the server checks (the client checks temperature, top_p... itself)
        expect_error("validation", lambda: client.generate("hi", stop_sequences=["a", "b", "c", "d", "e"]))
        out["greedy"] = client.generate("hello world", temperature=0.0, max_new_tokens=3).generated_text
        expect_error("too_long", lambda: client.generate("hi", max_new_tokens=100000))
        expect_error("bad_schema", lambda: client.generate("hi", response_format={"type": "json_object", "schema": {"type": "wat"}}))
        expect_error("stream_validation", lambda: list(client.generate_stream("hi", stop_sequences=["a"] * 5)))
        expect_error("missing_adapter", lambda: client.generate("hi", adapter_id="/nope/nothing",
                                                                adapter_source="local"))
    """,
    )
    assert out["validation"][0] == "ValidationError" and "`stop` supports up to" in out["validation"][1]
    assert out["greedy"] == http_generate(server, max_new_tokens=3)["generated_text"]  # LoRAX: 0 is greedy
    assert out["too_long"][0] == "ValidationError"
    assert out["bad_schema"][0] == "ValidationError" and "`response_format`" in out["bad_schema"][1]
    assert out["stream_validation"][0] == "ValidationError"
    # LoRAX's loader answers 424 `generation` for an adapter it cannot find or load
    assert out["missing_adapter"][0] == "GenerationError" and "adapter" in out["missing_adapter"][1]


def test_headers_are_sent_and_tokens_stay_secret(server: ServerProcess) -> None:
    secret = "hf_lorax_client_secret_987"
    out = run_client(
        server,
        f"""
        c = Client(url, headers={{"Authorization": "Bearer {secret}"}})
        out["ok"] = c.generate("hello world", max_new_tokens=3).generated_text
        expect_error("missing", lambda: c.generate("hi", adapter_id="/nope/x", adapter_source="local"))
    """,
    )
    assert out["ok"] == http_generate(server, max_new_tokens=3)["generated_text"]
    assert secret not in out["missing"][1] and secret not in server.log()


def test_watermark_is_honoured(server: ServerProcess) -> None:
    out = run_client(
        server,
        """
        r = client.generate("hello world", max_new_tokens=8, watermark=True, do_sample=True, seed=3)
        out["marked"] = [t.id for t in r.details.tokens]
    """,
    )
    plain = http_generate(server, max_new_tokens=8, do_sample=True, seed=3, details=True)
    again = http_generate(server, max_new_tokens=8, do_sample=True, seed=3, details=True, watermark=True)
    assert out["marked"] == [t["id"] for t in again["details"]["tokens"]]  # seeded and deterministic
    assert len(out["marked"]) == 8 and plain["details"]["tokens"]  # the bias is tested in tests/engine
