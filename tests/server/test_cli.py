"""The `loraserve` command line: LoRAX flag names, env vars, and one-off generation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.cli import build_parser, main
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.server.flags import SERVE_FLAGS

LORAX_FLAGS = (
    "--model-id",
    "--adapter-id",
    "--adapter-source",
    "--default-adapter-source",
    "--preloaded-adapter-ids",
    "--preloaded-adapter-source",
    "--max-concurrent-requests",
    "--max-best-of",
    "--max-stop-sequences",
    "--max-input-length",
    "--max-total-tokens",
    "--max-batch-prefill-tokens",
    "--max-batch-total-tokens",
    "--max-active-adapters",
    "--dtype",
    "--device",
    "--hostname",
    "--host",
    "--port",
    "--speculative-tokens",
    "--adapter-memory-fraction",
    "--max-waiting-tokens",
    "--cors-allow-origin",
)


def test_serve_help_lists_lorax_flags_with_env_vars(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in LORAX_FLAGS:
        assert flag in text, flag
    for env in ("MAX_INPUT_LENGTH", "PRELOADED_ADAPTER_IDS", "MAX_CONCURRENT_REQUESTS", "PORT"):
        assert f"env: {env}" in text


def test_env_vars_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_INPUT_LENGTH", "77")
    monkeypatch.setenv("PRELOADED_ADAPTER_IDS", "a/b,c/d")
    monkeypatch.setenv("EAGER_PREFILL", "true")
    args = build_parser().parse_args(["serve", "--model", "m", "--host", "127.0.0.1"])
    assert args.model_id == "m" and args.hostname == "127.0.0.1" and args.port == 8080
    assert args.max_input_length == 77 and args.preloaded_adapter_ids == ["a/b", "c/d"] and args.eager_prefill
    args = build_parser().parse_args(
        ["serve", "--model-id", "m", "--max-input-length", "5", "--preloaded-adapter-ids", "x", "y"]
    )
    assert args.max_input_length == 5 and args.preloaded_adapter_ids == ["x", "y"]


def test_native_kernels_flag_reaches_the_engine_config() -> None:
    from loraserve.cli import _engine_config

    on = build_parser().parse_args(["serve", "--model-id", "m"])
    off = build_parser().parse_args(["serve", "--model-id", "m", "--no-native-kernels"])
    assert _engine_config(on).native_kernels and not _engine_config(off).native_kernels


@pytest.mark.parametrize("extra", [["--quantize", "bitsandbytes"], ["--num-shard", "2"], ["--compile"]])
def test_unimplemented_features_refuse_to_start(extra: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model-id", "m", *extra]) == 2
    assert "not supported" in capsys.readouterr().err


def test_generate_command_matches_the_engine(tiny_assets) -> None:
    model, adapters = tiny_assets
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve.cli",
            "generate",
            "--model",
            str(model),
            "--adapter-id",
            str(adapters["alpha"]),
            "--max-new-tokens",
            "6",
            "hello world",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    engine = Engine.from_pretrained(model, EngineConfig(max_batch_total_tokens=1024))
    out = engine.generate(
        ["hello world"], SamplingParams(max_new_tokens=6), [parse_peft_adapter(adapters["alpha"])]
    )
    assert proc.stdout.rstrip("\n") == out[0].generated_text


def _serve_subprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    flag_envs = {f.env for f in SERVE_FLAGS}
    base = {k: v for k, v in os.environ.items() if k not in flag_envs}  # no stray LoRAX variables
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "serve", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"LOG_LEVEL": "verbose"},
            "invalid choice: 'verbose' (choose from 'debug', 'info', 'warning', 'error')",
        ),
        ({"DTYPE": "float64"}, "invalid choice: 'float64' (choose from 'float32', 'float16', 'bfloat16')"),
        ({"PORT": "eighty"}, "invalid int value: 'eighty'"),
        ({"ADAPTER_MEMORY_FRACTION": "a tenth"}, "invalid float value: 'a tenth'"),
        (
            {"JSON_OUTPUT": "maybe"},
            "invalid boolean value: 'maybe' (use one of 1, true, yes, on, 0, false, no, off)",
        ),
    ],
)
def test_bad_environment_values_are_usage_errors(env: dict[str, str], expected: str) -> None:
    """`LOG_LEVEL=verbose loraserve serve ...`: exit 2 with argparse's kind of message naming the
    variable and what it accepts, not a traceback and not a silently ignored value."""
    (name,) = env
    proc = _serve_subprocess("--model-id", "m", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"loraserve serve: error: environment variable {name} " in proc.stderr
    assert expected in proc.stderr


def test_environment_values_parse_like_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JSON_OUTPUT", "PREFIX_CACHING", "LOG_LEVEL", "ADAPTER_MEMORY_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JSON_OUTPUT", "False")
    monkeypatch.setenv("PREFIX_CACHING", " on ")
    monkeypatch.setenv("ADAPTER_MEMORY_FRACTION", "0.25")
    args = build_parser().parse_args(["serve", "--model-id", "m"])
    assert args.json_output is False and args.prefix_caching is True and args.adapter_memory_fraction == 0.25
    assert args.log_level == "info"  # unset: the flag's default
    # a flag on the command line wins over its variable, even a bad one
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    args = build_parser().parse_args(["serve", "--model-id", "m", "--log-level", "debug", "--json-output"])
    assert args.log_level == "debug" and args.json_output is True
    # LoRAX's launcher spells booleans with a value
    args = build_parser().parse_args(
        ["serve", "--model-id", "m", "--log-level", "info", "--json-output", "false"]
    )
    assert args.json_output is False


def test_bad_environment_values_do_not_break_other_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    args = build_parser().parse_args(["generate", "--model", "m", "hi"])
    assert args.command == "generate"
