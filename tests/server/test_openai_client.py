"""The official `openai` client against our `/v1` routes."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.fixtures.server import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def lorax(server: ServerProcess, inputs: str, **params) -> dict:
    r = httpx.post(
        server.url + "/generate",
        json={"inputs": inputs, "parameters": {**params, "details": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_matches_lorax_route_and_counts_usage(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    ref = lorax(server, "hello world", max_new_tokens=6)
    c = client.completions.create(model="", prompt="hello world", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text == ref["generated_text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == ref["details"]["prompt_tokens"] and c.usage.completion_tokens == 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6


def test_completion_with_adapter_as_model_and_echo_logprobs(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    alpha = str(server.adapters["alpha"])
    ref = lorax(server, "hello world", max_new_tokens=5, adapter_id=alpha)
    c = client.completions.create(model=alpha, prompt="hello world", max_tokens=5, echo=True, logprobs=2)
    assert c.choices[0].text == "hello world" + ref["generated_text"]
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t["logprob"] for t in ref["details"]["tokens"]], abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_completion_stream(server: ServerProcess, client: openai.OpenAI) -> None:
    ref = lorax(server, "hello world", max_new_tokens=7)
    chunks = list(
        client.completions.create(
            model="", prompt="hello world", max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref["generated_text"]
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 7


def test_completion_stop_is_cut_like_openai(server: ServerProcess, client: openai.OpenAI) -> None:
    text = lorax(server, "the quick", max_new_tokens=12)["generated_text"]
    stop = next(
        (
            text[i : i + 2]
            for i in range(2, len(text) - 2)
            if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i
        ),
        None,
    )
    if stop is None:
        pytest.skip(f"no usable stop in {text!r}")
    c = client.completions.create(model="", prompt="the quick", max_tokens=12, stop=[stop])
    assert c.choices[0].finish_reason == "stop" and c.choices[0].text == text[: text.find(stop)]
    streamed = list(
        client.completions.create(model="", prompt="the quick", max_tokens=12, stop=[stop], stream=True)
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text[: text.find(stop)]


def test_completion_n_choices(server: ServerProcess, client: openai.OpenAI) -> None:
    c = client.completions.create(model="", prompt="hello", max_tokens=4, n=3, temperature=1.0, seed=5)
    assert [ch.index for ch in c.choices] == [0, 1, 2] and c.usage.completion_tokens == 12


def test_chat_uses_the_template_and_matches_the_engine(server: ServerProcess, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    # The tiny model's template, rendered by hand: the chat route must send exactly these tokens.
    prompt = "<s>system: be brief\n<s>user: hello\nassistant: "
    beta = str(server.adapters["beta"])
    r = httpx.post(
        server.url + "/generate",
        timeout=60,
        json={
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": 6,
                "details": True,
                "decoder_input_details": True,
                "adapter_id": beta,
            },
        },
    )
    ref = r.json()
    c = client.chat.completions.create(model=beta, messages=messages, max_tokens=6, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref["generated_text"]
    assert c.usage.prompt_tokens == ref["details"]["prompt_tokens"] and c.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model=beta,
            messages=messages,
            max_tokens=6,
            temperature=0,  # chat samples without it (OpenAI's default)
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["generated_text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == ref["details"]["prompt_tokens"] + 6


def test_chat_logprobs(server: ServerProcess, client: openai.OpenAI) -> None:
    c = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,  # sampled (the chat default), a special token could end the content early
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)


def test_models_lists_base_and_adapters(server: ServerProcess, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == str(server.model_dir) and str(server.adapters["alpha"]) in ids
    c = client.completions.create(
        model=str(server.model_dir), prompt="hello world", max_tokens=3, temperature=0
    )
    assert c.choices[0].text == lorax(server, "hello world", max_new_tokens=3)["generated_text"]


def test_errors_surface_as_openai_exceptions(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="", prompt="hi", max_tokens=100000)
    assert "max_new_tokens" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError, match="not supported"):
        client.completions.create(model="", prompt="hi", max_tokens=2, logit_bias={"5": 1.0})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="/no/such/adapter", prompt="hi", max_tokens=2)
