"""The batched sampler against Hugging Face's logits processors, plus draw statistics."""

from __future__ import annotations

import math

import pytest
import torch

from loraserve.engine.logits_processors import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
)
from loraserve.engine.params import SamplingParams
from loraserve.engine.sampling import SamplingRow, make_generator, sample

lp = pytest.importorskip("transformers.generation.logits_process")


def rand_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same_distribution(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "masked positions differ"
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-6, rtol=0)


# ---- each processor vs HF ----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_vs_hf(temperature: float) -> None:
    x = rand_logits(6, 300, 0)
    ref = lp.TemperatureLogitsWarper(temperature)(None, x.clone())
    assert_same_distribution(apply_temperature(x, [temperature] * 6), ref)


@pytest.mark.parametrize("k", [1, 2, 10, 50, 299, 300, 1000])
def test_top_k_vs_hf(k: int) -> None:
    x = rand_logits(6, 300, 1)
    x[0, :5] = x[0, 5]  # ties at the boundary must all survive, as in HF
    ref = lp.TopKLogitsWarper(k)(None, x.clone())
    assert_same_distribution(apply_top_k(x, [k] * 6), ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_vs_hf(p: float) -> None:
    x = rand_logits(6, 300, 2)
    ref = lp.TopPLogitsWarper(p)(None, x.clone())
    assert_same_distribution(apply_top_p(x, [p] * 6), ref)


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.99])
def test_typical_p_vs_hf(mass: float) -> None:
    x = rand_logits(6, 300, 3)
    ref = lp.TypicalLogitsWarper(mass)(None, x.clone())
    assert_same_distribution(apply_typical_p(x, [mass] * 6), ref)


def test_mixed_per_row_parameters_vs_hf_row_by_row() -> None:
    """Every row with its own knobs (incl. disabled ones) equals HF applied to that row alone."""
    x = rand_logits(5, 400, 4)
    temps, ks, ps, typs = (
        [0.5, 1.0, 1.3, 0.9, 2.0],
        [0, 5, 40, 0, 400],
        [1.0, 0.9, 0.5, 0.7, 1.0],
        [1.0, 1.0, 0.8, 0.6, 0.95],
    )
    ours = apply_typical_p(apply_top_p(apply_top_k(apply_temperature(x, temps), ks), ps), typs)
    for i in range(5):
        procs = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(temps[i])])
        if ks[i]:
            procs.append(lp.TopKLogitsWarper(ks[i]))
        if ps[i] < 1:
            procs.append(lp.TopPLogitsWarper(ps[i]))
        if typs[i] < 1:
            procs.append(lp.TypicalLogitsWarper(typs[i]))
        assert_same_distribution(ours[i : i + 1], procs(None, x[i : i + 1].clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty_vs_hf(penalty: float) -> None:
    x = rand_logits(4, 200, 5)
    g = torch.Generator().manual_seed(6)
    histories = [torch.randint(0, 200, (n,), generator=g) for n in (1, 7, 30, 200)]
    histories[1][:3] = histories[1][3]  # repeated ids are penalized once
    histories[2][0] = 250  # an id past the lm_head (bigger embedding) is ignored
    ours = apply_repetition_penalty(x, [penalty] * 4, histories)
    for i, h in enumerate(histories):
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(h[None], x[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], ref, atol=0, rtol=0)


# ---- the sampler --------------------------------------------------------------------------------
def rows_for(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    histories: list[torch.Tensor | None] | None = None,
) -> list[SamplingRow]:
    seeds = seeds or list(range(len(params)))
    histories = histories or [None] * len(params)
    return [
        SamplingRow(params=p, generator=make_generator(s, "cpu") if p.do_sample else None, history=h)
        for p, s, h in zip(params, seeds, histories, strict=True)
    ]


def test_greedy_is_argmax_with_logprobs() -> None:
    x = rand_logits(8, 500, 7)
    out = sample(x, rows_for([SamplingParams(temperature=0.5)] * 8))  # temperature ignored without do_sample
    assert torch.equal(out.token_ids, x.argmax(-1))
    expected = torch.log_softmax(x, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=0)
    assert out.token_ids.device.type == "cpu" and out.token_ids.dtype == torch.long
    assert out.alternatives is None


def test_greedy_with_repetition_penalty_matches_hf() -> None:
    x = rand_logits(3, 100, 8)
    hist = [torch.tensor(x[i].topk(3).indices.tolist() + [1, 2]) for i in range(3)]
    params = [
        SamplingParams(repetition_penalty=3.0),
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5),
    ]
    out = sample(x, rows_for(params, histories=[hist[0], None, hist[2]]))
    for i, p in enumerate(params):
        ref = x[i : i + 1]
        if p.repetition_penalty != 1.0:
            ref = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(hist[i][None], ref.clone())
        assert int(out.token_ids[i]) == int(ref.argmax())
        torch.testing.assert_close(
            out.logprobs[i], torch.log_softmax(ref, -1)[0, out.token_ids[i]], atol=1e-5, rtol=0
        )


def test_low_precision_logits_and_temperature_zero() -> None:
    x = rand_logits(4, 256, 9).to(torch.bfloat16)
    out = sample(x, rows_for([SamplingParams(do_sample=True, temperature=0.0)] * 4))
    assert torch.equal(out.token_ids, x.float().argmax(-1))


def test_sampled_logprob_is_before_truncation() -> None:
    x = rand_logits(2, 300, 10)
    p = SamplingParams(do_sample=True, temperature=0.7, top_k=1)
    out = sample(x, rows_for([p, p]))
    assert torch.equal(out.token_ids, x.argmax(-1))  # top_k=1 leaves only the argmax
    ref = torch.log_softmax(x / 0.7, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)
    assert (out.logprobs < 0).all()


def test_alternatives_are_top_n_per_row() -> None:
    x = rand_logits(3, 300, 11)
    params = [
        SamplingParams(top_n_alternatives=5),
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=2.0, top_n_alternatives=2, seed=1),
    ]
    out = sample(x, rows_for(params))
    assert out.alternatives is not None
    assert out.alternatives[1] == []
    for i, n in ((0, 5), (2, 2)):
        ref = torch.log_softmax(x[i] / params[i].temperature if params[i].do_sample else x[i], -1).topk(n)
        assert [t for t, _ in out.alternatives[i]] == ref.indices.tolist()
        assert all(
            math.isclose(a, b, abs_tol=1e-5)
            for (_, a), b in zip(out.alternatives[i], ref.values.tolist(), strict=True)
        )
    assert out.alternatives[0][0][0] == int(out.token_ids[0])


def _noise_rows(n: int, seed: int) -> tuple[torch.Tensor, list[SamplingRow]]:
    g = torch.Generator().manual_seed(seed)
    choices = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=1.3, top_p=0.8),
        SamplingParams(do_sample=True, top_k=3),
        SamplingParams(repetition_penalty=1.4),
        SamplingParams(do_sample=True, typical_p=0.5, top_n_alternatives=3),
    ]
    params = [choices[int(torch.randint(0, len(choices), (1,), generator=g))] for _ in range(n)]
    hist = [torch.randint(0, 64, (5,), generator=g) for _ in range(n)]
    rows = rows_for(params, seeds=[seed * 100 + i for i in range(n)], histories=hist)
    return torch.randn(n, 64, generator=g) * 2, rows


def test_seeded_row_is_reproducible_alone_and_in_any_batch() -> None:
    params = SamplingParams(
        do_sample=True,
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        typical_p=0.95,
        repetition_penalty=1.2,
        seed=1234,
    )
    alone_gen, batch_gen = make_generator(1234, "cpu"), make_generator(1234, "cpu")
    logit_gen = torch.Generator().manual_seed(99)
    hist = torch.tensor([1, 5, 9])
    picked = set()
    for step in range(100):
        row_logits = torch.randn(1, 64, generator=logit_gen)
        alone = sample(row_logits, [SamplingRow(params, alone_gen, hist)])
        noise_logits, noise_rows = _noise_rows(step % 7 + 1, step)
        pos = step % (len(noise_rows) + 1)
        logits = torch.cat([noise_logits[:pos], row_logits, noise_logits[pos:]])
        rows = noise_rows[:pos] + [SamplingRow(params, batch_gen, hist)] + noise_rows[pos:]
        batched = sample(logits, rows)
        assert int(batched.token_ids[pos]) == int(alone.token_ids[0]), step
        assert float(batched.logprobs[pos]) == pytest.approx(float(alone.logprobs[0]), abs=1e-6)
        picked.add(int(alone.token_ids[0]))
    assert len(picked) > 5  # it really sampled


def test_same_seed_same_tokens_different_seed_differs() -> None:
    x = rand_logits(1, 64, 12, scale=1.0)
    p = SamplingParams(do_sample=True)

    def run(seed: int) -> list[int]:
        g = make_generator(seed, "cpu")
        return [int(sample(x, [SamplingRow(p, g, None)]).token_ids[0]) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(2**64 + 7) == run(7)  # seeds wrap at 64 bits


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# Chi-square critical values at p = 0.001 for 1..7 degrees of freedom.
CHI2_CRIT = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, temperature=0.6, top_k=5),
        SamplingParams(do_sample=True, temperature=1.4, top_p=0.8, typical_p=0.9),
        SamplingParams(do_sample=True, repetition_penalty=1.0, top_p=0.6),
    ],
)
def test_draws_follow_the_warped_distribution(params: SamplingParams) -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]])
    procs = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        procs.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(lp.TopPLogitsWarper(params.top_p))
    if params.typical_p < 1:
        procs.append(lp.TypicalLogitsWarper(params.typical_p))
    probs = procs(None, logits.clone()).softmax(-1)[0]
    kept = int((probs > 0).sum())
    assert kept >= 2
    batch = 400
    rows = [SamplingRow(params, make_generator(1000 + i, "cpu"), None) for i in range(batch)]
    counts = torch.zeros(8)
    for _ in range(50):  # 20,000 draws
        out = sample(logits.expand(batch, -1), rows)
        counts += torch.bincount(out.token_ids, minlength=8).float()
    assert _chi_square(counts, probs) < CHI2_CRIT[kept - 2]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_runs_on_device_and_returns_cpu_tensors(device: str) -> None:
    x = rand_logits(4, 1000, 13).to(device=device, dtype=torch.float16)
    hist = torch.tensor([1, 2, 3], device=device)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3, top_n_alternatives=2),
        SamplingParams(do_sample=True, top_p=0.9, seed=3),
        SamplingParams(do_sample=True, typical_p=0.5),
    ]
    rows = [
        SamplingRow(p, make_generator(i, device) if p.do_sample else None, hist) for i, p in enumerate(params)
    ]
    out = sample(x, rows)
    assert out.token_ids.device.type == "cpu" and out.logprobs.device.type == "cpu"
    assert int(out.token_ids[0]) == int(x[0].float().argmax())
    assert out.alternatives is not None and len(out.alternatives[1]) == 2
    again = sample(
        x,
        [
            SamplingRow(p, make_generator(i, device) if p.do_sample else None, hist)
            for i, p in enumerate(params)
        ],
    )
    assert torch.equal(out.token_ids, again.token_ids)
