"""LoRAX's own 0.7 Python client (from LoRAX's repository, not on PyPI) against our server.

Skipped unless `LORAX07_CLIENT_PATH` names a directory holding its `lorax` package (LoRAX's
`clients/python`); it runs in the 0.6.3 client's environment (`.venv-lorax`, or
`LORAX_CLIENT_PYTHON`), which has the same dependencies. `test_lorax07_wire.py` checks the same
contract without it, against a copy of the 0.7 models.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.server import ServerProcess

CLIENT_PATH = os.environ.get("LORAX07_CLIENT_PATH", "")
PYTHON = os.environ.get("LORAX_CLIENT_PYTHON") or str(
    Path(__file__).resolve().parents[2] / ".venv-lorax" / "bin" / "python"
)
pytestmark = pytest.mark.skipif(
    not (CLIENT_PATH and (Path(CLIENT_PATH) / "lorax" / "types.py").is_file() and Path(PYTHON).is_file()),
    reason="set LORAX07_CLIENT_PATH to LoRAX's clients/python (0.7) and have .venv-lorax",
)

SCRIPT = """
import json, sys
from lorax import Client
c = Client(sys.argv[1], timeout=60)
out = {}
r = c.generate("hello world", max_new_tokens=5, details=True, return_k_alternatives=2)
out["skipped"] = [r.details.skipped_tokens, [t.skipped for t in r.details.tokens]]
r = c.generate("hello world", max_new_tokens=3, decoder_input_details=True)
out["prefill"] = len(r.details.prefill) if r.details else 0
r = c.generate("hello world", max_new_tokens=3, best_of=2, do_sample=True, details=True)
out["best_of"] = len(r.details.best_of_sequences)
events = list(c.generate_stream("hello world", max_new_tokens=4, details=True))
out["stream"] = [len(events), events[-1].details.generated_tokens, events[-1].generated_text is not None]
try:
    list(c.generate_stream("hello world", max_new_tokens=4, top_k=0))
    out["stream_error"] = None
except Exception as e:
    out["stream_error"] = type(e).__name__
print(json.dumps(out))
"""


def test_the_07_client_parses_answers_and_stream_events(server: ServerProcess) -> None:
    proc = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(SCRIPT), server.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": CLIENT_PATH},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"] == [0, [False] * 5]
    assert out["prefill"] > 0 and out["best_of"] == 1
    assert out["stream"] == [4, 4, True]
    assert out["stream_error"] == "ValidationError"
