"""OpenAI's frequency and presence penalties, as a processor of the logits pipeline: against a
literal per-token loop, and end to end against transformers' logits with the same formula."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.errors import RequestError
from loraserve.engine.params import SamplingParams
from loraserve.engine.sampling import SamplingRow, sample
from tests.fixtures.tiny_models import load_hf_model


def reference(logits: torch.Tensor, output: list[int], freq: float, pres: float) -> torch.Tensor:
    out = logits.clone()
    for tok, n in Counter(output).items():
        out[tok] -= freq * n + pres
    return out


def test_penalties_match_the_openai_formula_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    outputs = [[3, 3, 7], [], [49, 0, 0, 0], [5]]
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.0),
        SamplingParams(frequency_penalty=2.0),
        SamplingParams(frequency_penalty=-1.0, presence_penalty=0.25),
        SamplingParams(),  # neutral: untouched
    ]
    rows = [
        SamplingRow(p, None, None, output=torch.tensor(o, dtype=torch.long)) for p, o in zip(params, outputs)
    ]
    out = sample(logits, rows)
    want = torch.stack(
        [
            reference(logits[i], o, p.frequency_penalty, p.presence_penalty)
            for i, (p, o) in enumerate(zip(params, outputs))
        ]
    )
    assert out.token_ids.tolist() == want.argmax(-1).tolist()
    torch.testing.assert_close(
        out.logprobs, torch.log_softmax(want, -1).gather(1, want.argmax(-1, keepdim=True))[:, 0]
    )


def test_greedy_with_penalties_matches_transformers_logits_plus_the_formula(llama_dir: Path) -> None:
    engine = Engine.from_pretrained(llama_dir, EngineConfig(kv_cache_memory_bytes=16 << 20))
    hf = load_hf_model(llama_dir)
    prompt = [1, 17, 33, 90, 5, 61, 7]
    freq, pres = 1.5, 2.0
    params = SamplingParams(
        max_new_tokens=24, ignore_eos_token=True, frequency_penalty=freq, presence_penalty=pres
    )
    got = [t.id for t in engine.generate([prompt], params)[0].tokens]
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(24):
            logits = hf(torch.tensor([ids])).logits[0, -1]
            tok = int(reference(logits, out, freq, pres).argmax())
            ids.append(tok)
            out.append(tok)
    assert got == out
    plain = [
        t.id
        for t in engine.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos_token=True))[0].tokens
    ]
    assert plain != got  # the penalties really changed the output


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [-2.5, 2.01, float("nan")])
def test_out_of_range_penalties_are_refused(field: str, value: float) -> None:
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value}).validate()
