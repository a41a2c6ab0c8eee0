"""OpenAI routes as LoRAX's router serves them (issue 15), against a real server.

Defaults that differ from LoRAX's `/generate`: completions without `max_tokens` run to the
remaining context, chat without `temperature` samples; every final stream chunk carries `usage`;
responses carry `system_fingerprint`; `best_of` picks the best `n` of its candidates.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.server import ServerProcess

PROMPT = "hello world"
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def chunks(r: httpx.Response) -> list[dict[str, Any]]:
    out = []
    for line in r.text.splitlines():
        if line.startswith("data:") and line.strip() != "data: [DONE]":
            out.append(json.loads(line[len("data:") :]))
    return out


def test_completion_without_max_tokens_runs_to_the_remaining_context(server: ServerProcess) -> None:
    info = httpx.get(server.url + "/info", timeout=30).json()
    body = {"model": "", "prompt": PROMPT, "temperature": 0, "ignore_eos_token": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == info["max_total_tokens"] - usage["prompt_tokens"]
    assert usage["completion_tokens"] > 16  # not OpenAI's legacy default


def test_chat_without_temperature_samples_and_temperature_zero_is_greedy(server: ServerProcess) -> None:
    base = {"model": "", "messages": CHAT, "max_tokens": 12, "ignore_eos_token": True}
    texts = set()
    for seed in range(6):
        r = post(server, "/v1/chat/completions", {**base, "seed": seed})
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["message"]["content"])
    assert len(texts) > 1, texts  # sampled: different seeds give different texts
    # seeded sampling repeats; greedy repeats without a seed
    again = post(server, "/v1/chat/completions", {**base, "seed": 3}).json()["choices"][0]["message"]
    first = post(server, "/v1/chat/completions", {**base, "seed": 3}).json()["choices"][0]["message"]
    assert again == first
    g1 = post(server, "/v1/chat/completions", {**base, "temperature": 0}).json()["choices"][0]["message"]
    g2 = post(server, "/v1/chat/completions", {**base, "temperature": 0}).json()["choices"][0]["message"]
    assert g1 == g2


def test_chat_carries_system_fingerprint_and_final_chunk_usage(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    c = client.chat.completions.create(model="", messages=CHAT, max_tokens=5, temperature=0)
    assert c.system_fingerprint and c.system_fingerprint.startswith("loraserve-")
    stream = list(
        client.chat.completions.create(model="", messages=CHAT, max_tokens=5, temperature=0, stream=True)
    )
    assert all(ch.system_fingerprint == c.system_fingerprint for ch in stream)
    final = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason]
    assert len(final) == 1 and final[0].usage is not None
    assert final[0].usage.completion_tokens == c.usage.completion_tokens
    assert final[0].usage.prompt_tokens == c.usage.prompt_tokens
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        == c.choices[0].message.content
    )


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_final_chunk_carries_usage(server: ServerProcess, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    got = chunks(r)
    final = [c for c in got if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["usage"]["completion_tokens"] == 6
    usage_only = [c for c in got if not c["choices"]]
    # OpenAI's stream_options.include_usage keeps its extra, choice-less last chunk
    assert len(usage_only) == (1 if include_usage else 0)
    if include_usage:
        assert got[-1] is usage_only[0] and usage_only[0]["usage"] == final[0]["usage"]


def test_chat_stream_options_include_usage_still_works(client: openai.OpenAI) -> None:
    stream = list(
        client.chat.completions.create(
            model="",
            messages=CHAT,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 4


def test_best_of_returns_the_best_n_sampled_candidates(server: ServerProcess) -> None:
    body = {
        "model": "",
        "prompt": PROMPT,
        "max_tokens": 6,
        "best_of": 3,
        "n": 2,
        "logprobs": 0,
        "ignore_eos_token": True,
    }
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in choices]
    assert sums[0] >= sums[1]  # best first
    assert r.json()["usage"]["completion_tokens"] == 12  # the tokens of the returned choices
    one = post(server, "/v1/completions", {**body, "n": 1})
    assert one.status_code == 200 and len(one.json()["choices"]) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"best_of": 1, "n": 2}, "`best_of` must be >= `n`"),
        ({"best_of": 2, "stream": True}, "`best_of` != 1 is not supported when streaming tokens"),
        ({"best_of": 2, "temperature": 0}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 9}, "`best_of` must be > 0 and <= 3"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ],
)
def test_completion_refusals(server: ServerProcess, body: dict[str, Any], message: str) -> None:
    r = post(server, "/v1/completions", {"model": "", "prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "validation" and error["message"].startswith(message), error


def test_penalties_are_accepted_and_applied_on_both_routes(server: ServerProcess) -> None:
    base = {"model": "", "max_tokens": 24, "temperature": 0, "ignore_eos_token": True}
    plain = post(server, "/v1/completions", {**base, "prompt": PROMPT}).json()["choices"][0]["text"]
    pen = {"frequency_penalty": 2.0, "presence_penalty": 2.0}
    r = post(server, "/v1/completions", {**base, "prompt": PROMPT, **pen})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] != plain
    chat_plain = post(server, "/v1/chat/completions", {**base, "messages": CHAT}).json()
    chat_pen = post(server, "/v1/chat/completions", {**base, "messages": CHAT, **pen})
    assert chat_pen.status_code == 200, chat_pen.text
    assert chat_pen.json()["choices"][0]["message"] != chat_plain["choices"][0]["message"]
