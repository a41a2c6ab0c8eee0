"""`response_format` over HTTP: LoRAX's `/generate` and `/generate_stream`, OpenAI's chat and
completions through the `openai` client; every answer parses as JSON and validates."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import ServerProcess

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["s", "m", "l"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "size", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def generate(server: ServerProcess, params: dict, path: str = "/generate") -> httpx.Response:
    body = {"inputs": "give me json", "parameters": {"max_new_tokens": 100, **params}}
    return httpx.post(server.url + path, json=body, timeout=60)


def valid(text: str, schema: dict = SCHEMA) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_generate_with_schema(server: ServerProcess, kind: str) -> None:
    r = generate(server, {"response_format": {"type": kind, "schema": SCHEMA}, "details": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["details"]["finish_reason"] == "eos_token"
    valid(out["generated_text"])


def test_generate_sampled_with_adapter(server: ServerProcess) -> None:
    params = {
        "response_format": {"type": "json_object", "schema": SCHEMA},
        "adapter_id": str(server.adapters["alpha"]),
        "do_sample": True,
        "seed": 3,
        "temperature": 0.8,
    }
    r = generate(server, params)
    assert r.status_code == 200, r.text
    valid(r.json()["generated_text"])


def test_generate_stream_with_schema(server: ServerProcess) -> None:
    body = {
        "inputs": "give me json",
        "parameters": {"max_new_tokens": 100, "response_format": {"type": "json_schema", "schema": SCHEMA}},
    }
    text, final = "", None
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            assert "error" not in ev, ev
            if not ev["token"]["special"]:
                text += ev["token"]["text"]
            if ev["generated_text"] is not None:
                final = ev["generated_text"]
    assert final == text
    valid(final)


def test_text_format_is_free_text(server: ServerProcess) -> None:
    free = generate(server, {"max_new_tokens": 8}).json()["generated_text"]
    r = generate(server, {"max_new_tokens": 8, "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["generated_text"] == free


@pytest.mark.parametrize(
    "rf",
    [
        {"type": "json_object", "schema": {"type": "wat"}},
        {"type": "json_schema"},
        {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
    ],
)
def test_bad_response_format_is_422_naming_it(server: ServerProcess, rf: dict) -> None:
    r = generate(server, {"response_format": rf})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and "response_format" in r.json()["error"]


def test_chat_json_schema_through_openai_client(client: openai.OpenAI) -> None:
    c = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "a json please"}],
        max_tokens=100,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True},
        },
    )
    assert c.choices[0].finish_reason == "stop"
    valid(c.choices[0].message.content)


def test_chat_json_object_stream(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "a json object"}],
        max_tokens=100,
        seed=5,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.startswith("{")  # any object: the random model may not close it within the budget


def test_completion_json_schema(client: openai.OpenAI) -> None:
    c = client.completions.create(
        model="",
        prompt="json:",
        max_tokens=100,
        temperature=0,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
        },
    )
    valid(c.choices[0].text)


@pytest.mark.parametrize(
    "rf",
    [
        {"type": "json_schema", "json_schema": {"name": "t"}},
        {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "wat"}}},
        {"type": "yaml"},
    ],
)
def test_openai_bad_response_format_is_422(server: ServerProcess, rf: dict) -> None:
    body = {"model": "", "messages": [{"role": "user", "content": "x"}], "response_format": rf}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert "response_format" in r.text


def test_lorax_client_response_format(server: ServerProcess) -> None:
    from tests.server.test_lorax_client import LORAX_PYTHON, run_client

    if not Path(LORAX_PYTHON).is_file():
        pytest.skip("lorax-client venv not found: run `make lorax-client`")
    out = run_client(
        server,
        f"""
        schema = json.loads({json.dumps(SCHEMA)!r})
        r = client.generate("give me json", max_new_tokens=100, response_format={{"type": "json_object", "schema": schema}})
        out["text"] = r.generated_text
        out["reason"] = str(r.details.finish_reason)
        """,
    )
    assert out["reason"] == "FinishReason.EndOfSequenceToken"
    valid(out["text"])


def test_best_of_candidates_are_all_constrained(server: ServerProcess) -> None:
    params = {
        "response_format": {"type": "json_schema", "schema": SCHEMA},
        "best_of": 2,
        "do_sample": True,
        "details": True,
    }
    r = generate(server, params)
    assert r.status_code == 200, r.text
    out = r.json()
    valid(out["generated_text"])
    for seq in out["details"]["best_of_sequences"] or []:
        valid(seq["generated_text"])


def test_stop_sequence_cuts_a_constrained_answer(server: ServerProcess) -> None:
    """A stop sequence ends a constrained answer as it ends free text: LoRAX keeps the sequence
    and says `stop_sequence`; OpenAI cuts it off and says `stop`."""
    rf = {"type": "json_schema", "schema": SCHEMA}
    out = generate(server, {"response_format": rf, "stop": [', "size"'], "details": True}).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["generated_text"].startswith('{"name": "') and out["generated_text"].endswith(', "size"')
    body = {"model": "", "prompt": "give me json", "max_tokens": 100, "temperature": 0, "stop": [', "size"']}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    c = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert c["finish_reason"] == "stop" and c["text"].startswith('{"name": "') and '"size"' not in c["text"]


def test_seeded_constrained_sampling_repeats_and_n_choices_all_validate(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}

    def ask(seed: int, n: int = 1) -> list[str]:
        c = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "json"}],
            max_tokens=100,
            temperature=1.0,
            seed=seed,
            n=n,
            response_format=rf,
        )
        return [ch.message.content for ch in c.choices]

    first = ask(11)
    assert ask(11) == first  # same seed, same answer
    choices = ask(11, n=3)
    assert choices[0] == first[0] and len(choices) == 3  # choice j samples with seed + j
    for text in choices + ask(12):
        valid(text)
