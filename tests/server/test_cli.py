"""The `loraserve` command line: LoRAX flag names, env vars, and one-off generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_kv_cache_dtype_flag_reaches_the_engine_config() -> None:
    from loraserve.cli import _engine_config

    default = build_parser().parse_args(["serve", "--model-id", "m"])
    bf16 = build_parser().parse_args(["serve", "--model-id", "m", "--kv-cache-dtype", "bfloat16"])
    assert _engine_config(default).kv_cache_dtype == "auto"
    assert _engine_config(bf16).kv_cache_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model-id", "m", "--kv-cache-dtype", "fp8"])


@pytest.mark.parametrize("extra", [["--quantize", "gptq"], ["--num-shard", "2"], ["--compile"]])
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


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from tests.fixtures.fake_hub import FakeHub, point_hf_at

    hub = FakeHub().start()
    point_hf_at(monkeypatch, hub, tmp_path / "hf-home")
    for flag in SERVE_FLAGS:
        monkeypatch.delenv(flag.env, raising=False)
    yield hub
    hub.stop()


def _expected_text(model: Path, prompt: str = "hello world") -> str:
    engine = Engine.from_pretrained(model, EngineConfig(kv_cache_memory_bytes=16 << 20))
    return engine.generate([prompt], SamplingParams(max_new_tokens=6))[0].generated_text


def test_generate_reads_the_model_from_the_hub_at_a_revision_and_with_a_token(
    hub_env, tiny_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tests.fixtures.fake_hub import files_of

    model, _ = tiny_assets
    sha = hub_env.add_repo("org/tiny", files_of(model))
    hub_env.add_repo("org/tiny", {"README.md": b"a later commit without weights"})
    hub_env.add_repo("org/private", files_of(model), private=True, tokens=("hf_cli_token",))
    expected = _expected_text(model)
    assert (
        main(["generate", "--model", "org/tiny", "--revision", sha, "--max-new-tokens", "6", "hello world"])
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert main(["generate", "--model", "org/tiny", "hello world"]) == 2  # main has no weights now
    err = capsys.readouterr().err
    assert "error: hub model org/tiny@main has no config.json" in err and "Traceback" not in err
    assert main(["generate", "--model", "org/private", "hello world"]) == 2
    assert "repository not found or private (a private repo needs HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_cli_token")
    assert main(["generate", "--model-id", "org/private", "--max-new-tokens", "6", "hello world"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_generate_reads_the_model_from_s3(tiny_assets, tmp_path: Path, monkeypatch, capsys) -> None:
    from tests.fixtures.s3_server import S3TestServer

    model, _ = tiny_assets
    server = S3TestServer().start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        uri = server.upload_dir(model, "base-models", "tiny")
        args = ["generate", "--source", "s3", "--model-cache-dir", str(tmp_path), "--max-new-tokens", "6"]
        assert main([*args, "--model", uri, "hello world"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == _expected_text(model)
        assert main([*args, "--model", "s3://base-models/none", "hello world"]) == 2
        assert "error: tried s3://base-models/none on S3: not found" in capsys.readouterr().err
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model-id", "org/missing"], "tried org/missing@main on the Hugging Face Hub (http://127.0.0.1:"),
        (["--model-id", "org/tiny", "--revision", "v9"], "tried org/tiny@v9 on the Hugging Face Hub"),
        (["--model-id", "org/tiny", "--source", "local"], "--model-id org/tiny: no such directory"),
        (
            ["--model-id", "org/bin"],
            "hub model org/bin@main has no *.safetensors weights (it has pytorch_model.bin)",
        ),
        (["--model-id", "./typo dir"], "--model-id ./typo dir: no such local directory or file"),
        (["--model-id", "no//such dir"], "not a local directory and not a valid hub repo id"),
        (["--model-id", "/x/m.gguf"], "--model-id /x/m.gguf: no such GGUF file"),
        (["--model-id", "org/tiny", "--source", "s3"], "--model-id must look like s3://bucket/prefix"),
    ],
)
def test_serve_says_what_was_tried_when_the_model_cannot_be_read(
    hub_env, tiny_assets, argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    from tests.fixtures.fake_hub import files_of

    model, _ = tiny_assets
    hub_env.add_repo("org/tiny", files_of(model))
    hub_env.add_repo("org/bin", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    assert main(["serve", *argv, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_serve_offline_without_a_cached_copy(hub_env, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["serve", "--model-id", "org/tiny", "--port", "1"]) == 2
    assert "offline (HF_HUB_OFFLINE=1) and it is not in the local cache" in capsys.readouterr().err
    assert hub_env.requests == []


def test_serve_from_the_hub(hub_env, tiny_assets, tmp_path: Path) -> None:
    import httpx

    from tests.fixtures.fake_hub import files_of
    from tests.fixtures.server import start_server

    model, _ = tiny_assets
    hub_env.add_repo("org/served", files_of(model))
    env = {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HOME")}
    server = start_server(Path("org/served"), tmp_path, env=env)
    try:
        info = httpx.get(f"{server.url}/info", timeout=10).json()
        out = httpx.post(
            f"{server.url}/generate",
            json={"inputs": "hello world", "parameters": {"max_new_tokens": 6}},
            timeout=30,
        ).json()
    finally:
        server.stop()
    assert info["model_id"] == "org/served"
    assert out["generated_text"] == _expected_text(model)


def _notes(*extra: str) -> list[str]:
    from loraserve.cli import _ignored_flags

    return _ignored_flags(build_parser().parse_args(["serve", "--model-id", "m", *extra]))


@pytest.fixture
def no_flag_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in SERVE_FLAGS:
        monkeypatch.delenv(flag.env, raising=False)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--trust-remote-code"], "--trust-remote-code is ignored: loraserve never runs code"),
        (["--eager-prefill", "true"], "--eager-prefill true has no effect"),
        (["--eager-prefill", "false"], "--eager-prefill false has no effect"),
        (["--max-waiting-tokens", "5"], "--max-waiting-tokens 5 has no effect"),
        (["--waiting-served-ratio", "2.5"], "--waiting-served-ratio 2.5 has no effect"),
    ],
)
def test_flags_without_effect_are_named_at_start(no_flag_env: None, extra: list[str], expected: str) -> None:
    (note,) = _notes(*extra)
    assert note.startswith(expected), note


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--prefix-caching", "false"],
        ["--chunked-prefill", "false"],
        ["--prefix-caching", "true", "--chunked-prefill", "true"],  # both implemented: nothing to warn
        ["--trust-remote-code", "false"],
        ["--max-waiting-tokens", "20", "--waiting-served-ratio", "1.2"],  # LoRAX's defaults
    ],
)
def test_defaults_and_false_stay_silent(no_flag_env: None, extra: list[str]) -> None:
    assert _notes(*extra) == []


def test_the_warnings_appear_when_the_server_starts(tiny_assets, tmp_path) -> None:
    from tests.fixtures.server import start_server

    model, _ = tiny_assets
    server = start_server(
        model,
        tmp_path,
        "--trust-remote-code",
        "--prefix-caching",
        "true",
        "--chunked-prefill",
        "true",
        "--max-waiting-tokens",
        "7",
        env={"WAITING_SERVED_RATIO": "3"},
    )
    try:
        log = server.log()
    finally:
        server.stop()
    warnings = [line for line in log.splitlines() if " WARNING loraserve: " in line]
    for expected in (
        "--trust-remote-code is ignored",
        "--max-waiting-tokens 7 has no effect",
        "--waiting-served-ratio 3.0 has no effect",
    ):
        assert sum(expected in line for line in warnings) == 1, (expected, log)


def test_an_unknown_architecture_is_refused_at_start_with_the_supported_list(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FalconForCausalLM"], "num_attention_heads": 2, "hidden_size": 8})
    )
    assert main(["serve", "--model-id", str(tmp_path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'FalconForCausalLM'" in err and "Phi3ForCausalLM" in err
    assert "Traceback" not in err
