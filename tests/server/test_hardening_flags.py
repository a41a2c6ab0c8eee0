"""Issue 17's caps are flags with environment variables and sane defaults, checked like every flag."""

from __future__ import annotations

import pytest

from loraserve.cli import build_parser

DEFAULTS = {
    "max_adapter_labels": 100,
    "max_listed_adapters": 100,
    "header_read_timeout_s": 10.0,
    "body_read_timeout_s": 30.0,
    "keep_alive_timeout_s": 5.0,
    "max_connections": 512,
    "adapter_disk_cache_bytes": 20 << 30,
    "adapter_disk_cache_grace_s": 10.0,
}


def serve_args(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(["serve", "--model-id", "m", *argv]))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DEFAULTS:
        monkeypatch.delenv(name.upper(), raising=False)
    args = serve_args([])
    assert {k: args[k] for k in DEFAULTS} == DEFAULTS


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTER_DISK_CACHE_BYTES", "123456")
    monkeypatch.setenv("HEADER_READ_TIMEOUT_S", "2.5")
    monkeypatch.setenv("MAX_ADAPTER_LABELS", "7")
    args = serve_args(["--max-connections", "64", "--max-adapter-labels", "9"])
    assert args["adapter_disk_cache_bytes"] == 123456 and args["header_read_timeout_s"] == 2.5
    assert args["max_connections"] == 64 and args["max_adapter_labels"] == 9  # the flag wins


def test_bad_environment_value_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("ADAPTER_DISK_CACHE_BYTES", "lots")
    with pytest.raises(SystemExit) as e:
        serve_args([])
    assert e.value.code == 2 and "ADAPTER_DISK_CACHE_BYTES" in capsys.readouterr().err
