"""`--json-output`: every line the server writes is one JSON object (uvicorn's too), and
credentials stay masked in every field."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import httpx

from loraserve.server.log_redaction import RedactingFilter
from loraserve.server.logging_setup import RedactingJsonFormatter
from tests.fixtures.server import start_server

SECRET = "hf_" + "Zq8" * 10  # shaped like a Hugging Face token, set as the server's HF_TOKEN


def _record(name: str, msg: str, args: tuple = (), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_formatter_writes_one_json_object_per_record_with_secrets_masked() -> None:
    redactor = RedactingFilter(["s3cr3t-value"])
    fmt = RedactingJsonFormatter(redactor)
    try:
        raise ValueError('bad "token" s3cr3t-value\nsecond line \\ end')
    except ValueError:
        failed = logging.LogRecord("loraserve", logging.ERROR, __file__, 1, "load failed", (), sys.exc_info())
    records = [
        # uvicorn's access logger formats its fields from args
        _record(
            "uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", "/x?token=abc", "1.1", 200)
        ),
        _record("uvicorn.error", "Started server process [%d]", (42,), color_message="\x1b[36m%d\x1b[0m"),
        _record("loraserve", 'quote " backslash \\ newline\n tab\t Bearer abc.def'),
        _record("loraserve", "extra fields are masked too", headers={"Authorization": "Bearer s3cr3t-value"}),
        failed,
    ]
    for record in records:
        redactor.filter(record)  # what the root handler does before formatting
        line = fmt.format(record)
        assert "\n" not in line
        data = json.loads(line)
        assert {"time", "level", "logger", "message"} <= data.keys()
        assert "s3cr3t-value" not in line and "abc.def" not in line and "token=abc" not in line
        assert "color_message" not in data
    assert json.loads(fmt.format(records[1]))["message"] == "Started server process [42]"
    exc = json.loads(fmt.format(failed))
    assert exc["level"] == "ERROR" and "ValueError" in exc["exc_info"] and "***" in exc["exc_info"]


def test_json_output_server_writes_only_json_lines(tiny_assets: tuple[Path, dict], tmp_path: Path) -> None:
    model, adapters = tiny_assets
    server = start_server(
        model,
        tmp_path,
        "--json-output",
        "--trust-remote-code",  # a start-up warning, which must be JSON too
        "--adapter-source",
        "local",
        "--preloaded-adapter-ids",
        str(adapters["alpha"]),
        env={"HF_TOKEN": SECRET},
    )
    try:
        ok = httpx.post(
            f"{server.url}/generate",
            json={
                "inputs": "hello",
                "parameters": {"max_new_tokens": 3, "adapter_id": str(adapters["alpha"])},
            },
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
        missing = httpx.post(
            f"{server.url}/generate",
            json={
                "inputs": "hello",
                "parameters": {"adapter_id": str(tmp_path / "nope"), "adapter_source": "local"},
            },
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=60,
        )
        assert missing.status_code >= 400
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
    finally:
        server.stop()
    lines = [ln for ln in server.log().splitlines() if ln.strip()]
    assert lines
    loggers = set()
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssertionError(f"not a JSON line: {line!r}") from e
        assert isinstance(data, dict) and {"time", "level", "logger", "message"} <= data.keys(), line
        loggers.add(data["logger"])
        if data["level"] == "WARNING" and "--trust-remote-code is ignored" in data["message"]:
            loggers.add("warned")
    assert {"uvicorn.error", "loraserve", "warned"} <= loggers, loggers
    assert SECRET not in server.log()
