"""Per-request adapter auth, fuzzed, and secrets kept out of logs, errors, `/metrics` and `/info`.

The private adapter lives on the fake hub (which knows Alice's and Bob's
tokens; only Alice may read the repo). The server runs with
`--adapter-auth-ttl-s 0`, so every request is checked against the hub even
when the adapter is already in host memory.
"""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.good_traffic import error_message
from tests.reliability.stack import ALICE, BOB, MALLORY, PRIVATE_REPO, PROMPTS, SECRETS, Stack, good_body

PUBLIC_ANSWER_KEY = (PROMPTS[0], "delta")  # the private repo holds the delta weights
seen_bodies: list[str] = []  # every response of this module, grepped for secrets at the end


def ask(
    stack: Stack, token: str | None = None, header: str | None = None, path: str = "/generate"
) -> httpx.Response:
    params = {"adapter_id": PRIVATE_REPO, "adapter_source": "hub"}
    if token is not None:
        params["api_token"] = token
    headers = {"authorization": header} if header is not None else {}
    if path == "/generate":
        body = good_body(stack, PROMPTS[0], None, **params)
    else:
        body = {
            "model": PRIVATE_REPO,
            "prompt": PROMPTS[0],
            "max_tokens": 6,
            "ignore_eos_token": True,
            "adapter_source": "hub",
            **({"api_token": token} if token is not None else {}),
        }
    r = httpx.post(stack.url + path, json=body, headers=headers, timeout=60)
    seen_bodies.append(r.text)
    return r


# (name, api_token parameter, Authorization header, allowed statuses)
REFUSED = [
    ("missing", None, None, (401,)),
    ("empty-parameter", "", None, (401,)),
    ("forged", MALLORY, None, (401,)),
    ("forged-header", None, f"Bearer {MALLORY}", (401,)),
    ("another-users-token", BOB, None, (401, 403, 404, 424)),  # 424 on /generate, 404 on /v1
    ("another-users-header", None, f"Bearer {BOB}", (401, 403, 404, 424)),  # 424 on /generate, 404 on /v1
    ("not-a-bearer-scheme", None, f"Basic {ALICE}", (401,)),
    ("bearer-without-token", None, "Bearer", (401,)),
    ("token-with-whitespace", f" {ALICE}x ", None, (401,)),
    ("parameter-wins-over-valid-header", MALLORY, f"Bearer {ALICE}", (401,)),
    ("case-changed-token", ALICE.upper(), None, (401,)),
    ("token-prefix", ALICE[:-1], None, (401,)),
]


def test_valid_token_in_parameter_or_header_is_served(stack: Stack, oracle: dict) -> None:
    # The parameter wins over the header, as in LoRAX.
    for r in (
        ask(stack, ALICE),
        ask(stack, header=f"Bearer {ALICE}"),
        ask(stack, ALICE, f"Bearer {MALLORY}"),
    ):
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == oracle[PUBLIC_ANSWER_KEY]
    r = ask(stack, ALICE, path="/v1/completions")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name,token,header,statuses", REFUSED, ids=[c[0] for c in REFUSED])
def test_cached_private_adapter_is_never_served_without_a_valid_token(
    stack: Stack, name: str, token: str | None, header: str | None, statuses: tuple[int, ...]
) -> None:
    assert ask(stack, ALICE).status_code == 200  # the adapter is in host memory right now
    for path in ("/generate", "/v1/completions"):
        r = ask(stack, token, header, path)
        assert r.status_code in statuses, (path, r.status_code, r.text)
        message = error_message(r)
        assert PRIVATE_REPO in message or "api_token" in message, message


def test_revoked_token_is_refused_at_once(stack: Stack) -> None:
    hub = stack.peers.hub
    revocable = "hf_revocableTokenRRRRRRRRRRRRR"
    hub.add_repo(PRIVATE_REPO, stack.assets.good["delta"], private=True, tokens=(revocable,))
    assert ask(stack, revocable).status_code == 200
    hub.revoke(revocable)
    try:
        r = ask(stack, revocable)
        assert r.status_code == 401, r.text
        assert ask(stack, ALICE).status_code == 200  # other users are unaffected
    finally:
        hub.add_token(revocable)


def test_secrets_never_leak_into_logs_errors_metrics_or_info(stack: Stack) -> None:
    # Make sure the paths that touch credentials ran: an S3 download (signed with the AWS keys)
    # and hub calls carrying caller tokens, good and bad.
    r = httpx.post(
        stack.url + "/generate",
        timeout=60,
        json=good_body(
            stack, PROMPTS[0], None, adapter_id=stack.peers.s3_uri("secrets"), adapter_source="s3"
        ),
    )
    assert r.status_code == 200, r.text
    for token in (ALICE, BOB, MALLORY):
        ask(stack, token)
        ask(stack, header=f"Bearer {token}", path="/v1/completions")
    exposed = {
        "server log": stack.server.log(),
        "responses": "\n".join(seen_bodies),
        "/metrics": httpx.get(stack.url + "/metrics").text,
        "/info": httpx.get(stack.url + "/info").text,
        "/v1/models": httpx.get(stack.url + "/v1/models").text,
    }
    assert "DEBUG" in exposed["server log"]  # the server ran at debug level, where clients log headers
    leaks = [
        f"{secret[:6]}... in {where}"
        for where, text in exposed.items()
        for secret in SECRETS
        if secret in text
    ]
    assert not leaks, leaks
