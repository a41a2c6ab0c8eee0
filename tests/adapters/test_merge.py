"""Adapter merging: PEFT's merge utilities are the oracle for linear and TIES."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.merge import (
    MergeError,
    MergeSpec,
    dare_generator,
    merge_adapters,
    merge_tensors,
)
from loraserve.adapters.peft_format import parse_peft_adapter
from tests.adapters.merge_fixtures import build_assets, raw_lora_tensors

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_assets(tmp_path_factory.mktemp("merge"))


def _parsed(assets: tuple[Path, dict[str, Path]], names: list[str]) -> list[LoraAdapter]:
    return [parse_peft_adapter(assets[1][n], key=f"local:{n}") for n in names]


def _merge(assets, names: list[str], spec: MergeSpec) -> LoraAdapter:
    adapters = _parsed(assets, names)
    return merge_adapters(adapters, spec, spec.cache_key([a.key for a in adapters]))


def _oracle(
    assets, names: list[str], weights: list[float], fn, **kw
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Per (layer, module) and side: PEFT's merge function over the adapters that have it."""
    raws = [raw_lora_tensors(assets[1][n]) for n in names]
    w = torch.tensor(weights)
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for slot in sorted({s for r in raws for s in r}):
        idx = [i for i, r in enumerate(raws) if slot in r]
        out[slot] = {side: fn([raws[i][slot][side] for i in idx], w[idx], **kw) for side in ("A", "B")}
    return out


def _assert_matches_oracle(merged: LoraAdapter, oracle: dict) -> None:
    assert set(merged.modules) == set(oracle)
    for slot, sides in oracle.items():
        m = merged.modules[slot]
        torch.testing.assert_close(m.a, sides["A"], atol=1e-6, rtol=0)
        torch.testing.assert_close(m.b, sides["B"], atol=1e-6, rtol=0)


# ---- oracle: linear and TIES -------------------------------------------------


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1.0, -0.5], [2.0, 0.25]])
def test_linear_matches_peft_task_arithmetic(assets, weights: list[float]) -> None:
    spec = MergeSpec(ids=["a1", "a2"], weights=weights)
    merged = _merge(assets, ["a1", "a2"], spec)
    _assert_matches_oracle(merged, _oracle(assets, ["a1", "a2"], weights, merge_utils.task_arithmetic))


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_matches_peft_ties(assets, sign: str, density: float) -> None:
    names, weights = ["a1", "a2", "a3"], [0.5, 1.5, 0.8]
    spec = MergeSpec(
        ids=names, weights=weights, merge_strategy="ties", density=density, majority_sign_method=sign
    )
    merged = _merge(assets, names, spec)
    oracle = _oracle(assets, names, weights, merge_utils.ties, density=density, majority_sign_method=sign)
    _assert_matches_oracle(merged, oracle)


def test_union_of_targets_and_first_adapters_config(assets) -> None:
    names = ["a1", "a2", "a3"]
    merged = _merge(assets, names, MergeSpec(ids=names, weights=[1.0, 1.0, 1.0]))
    assert merged.target_modules == ("down_proj", "k_proj", "o_proj", "q_proj", "v_proj")  # sorted names
    assert (merged.rank, merged.alpha, merged.use_rslora) == (8, 16.0, False)
    # Every module, including k/o (only a2, alpha 32) and down (only a3, alpha 8), uses a1's alpha/r.
    assert {m.scale for m in merged.modules.values()} == {2.0}
    assert merged.config["target_modules"] == list(merged.target_modules)
    assert merged.config["lora_alpha"] == 16.0
    # A module only a2 has is a2's tensors times a2's weight alone.
    raw2 = raw_lora_tensors(assets[1]["a2"])
    torch.testing.assert_close(merged.modules[(0, "k_proj")].b, raw2[(0, "k_proj")]["B"], atol=0, rtol=0)


def test_rslora_first_adapter_scale(tmp_path: Path, assets) -> None:
    from tests.fixtures.tiny_models import make_peft_adapter

    rs = make_peft_adapter(
        assets[0], tmp_path / "rs", r=8, target_modules=("q_proj",), seed=9, use_rslora=True, lora_alpha=16
    )
    adapters = [parse_peft_adapter(rs, key="rs"), parse_peft_adapter(assets[1]["a2"], key="a2")]
    spec = MergeSpec(ids=["rs", "a2"], weights=[1.0, 1.0])
    merged = merge_adapters(adapters, spec, spec.cache_key(["rs", "a2"]))
    assert merged.use_rslora
    assert {m.scale for m in merged.modules.values()} == {16 / math.sqrt(8)}


def test_single_id_is_the_plain_adapter(assets) -> None:
    (a1,) = _parsed(assets, ["a1"])
    spec = MergeSpec(ids=["a1"], weights=[0.1], merge_strategy="ties", density=0.5)
    assert merge_adapters([a1], spec, "ignored") is a1


def test_different_ranks_are_refused_naming_them(assets) -> None:
    adapters = _parsed(assets, ["a1", "r4"])
    spec = MergeSpec(ids=["a1", "r4"], weights=[1.0, 1.0])
    with pytest.raises(MergeError, match=r"different ranks.*a1: r=8.*r4: r=4") as e:
        merge_adapters(adapters, spec, "k")
    assert e.value.status_code == 422
    assert isinstance(e.value, ValueError) and isinstance(e.value, AdapterError)


# ---- DARE ---------------------------------------------------------------------


def _digest(adapter: LoraAdapter) -> str:
    h = hashlib.sha256()
    for slot in sorted(adapter.modules):
        m = adapter.modules[slot]
        h.update(repr(slot).encode())
        h.update(m.a.numpy().tobytes())
        h.update(m.b.numpy().tobytes())
    return h.hexdigest()


_SUBPROCESS_MERGE = """
import sys, hashlib
from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft_format import parse_peft_adapter
names, dirs = sys.argv[1].split(","), sys.argv[2].split(",")
adapters = [parse_peft_adapter(d, key=f"local:{n}") for n, d in zip(names, dirs)]
spec = MergeSpec(ids=names, weights=[0.6, 0.9], merge_strategy=sys.argv[3], density=0.4)
merged = merge_adapters(adapters, spec, spec.cache_key([a.key for a in adapters]))
h = hashlib.sha256()
for slot in sorted(merged.modules):
    m = merged.modules[slot]
    h.update(repr(slot).encode()); h.update(m.a.numpy().tobytes()); h.update(m.b.numpy().tobytes())
print(h.hexdigest())
"""


def test_dare_is_deterministic_in_process_and_across_restart(assets) -> None:
    names = ["a1", "a2"]
    digests = {}
    for strategy in ("dare_linear", "dare_ties"):
        spec = MergeSpec(ids=names, weights=[0.6, 0.9], merge_strategy=strategy, density=0.4)
        first, second = _merge(assets, names, spec), _merge(assets, names, spec)
        digests[strategy] = _digest(first)
        assert digests[strategy] == _digest(second)
    # A different spec draws different masks.
    other = MergeSpec(ids=names, weights=[0.6, 0.9], merge_strategy="dare_linear", density=0.5)
    assert _digest(_merge(assets, names, other)) != digests["dare_linear"]
    dirs = ",".join(str(assets[1][n]) for n in names)
    for strategy in ("dare_linear", "dare_ties"):
        out = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS_MERGE, ",".join(names), dirs, strategy],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert out.stdout.strip() == digests[strategy], out.stderr


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_linear_keeps_density_fraction_rescaled(assets, density: float) -> None:
    """With weights [1, 0] the merge is adapter one's DARE-pruned tensors alone."""
    names = ["a1", "a2"]
    spec = MergeSpec(ids=names, weights=[1.0, 0.0], merge_strategy="dare_linear", density=density)
    merged = _merge(assets, names, spec)
    raw1 = raw_lora_tensors(assets[1]["a1"])
    kept = total = 0
    for slot, sides in raw1.items():
        m = merged.modules[slot]
        for side, ours in (("A", m.a), ("B", m.b)):
            orig = sides[side]
            assert (orig != 0).all()
            keep = ours != 0
            kept += int(keep.sum())
            total += keep.numel()
            torch.testing.assert_close(ours[keep], orig[keep] / density, rtol=1e-6, atol=0)
    frac = kept / total
    # binomial std over ~10k entries is < 0.005
    assert abs(frac - density) < 0.03, (frac, density)


def test_dare_masks_are_independent_per_side_and_adapter() -> None:
    t = torch.ones(64, 64)
    spec = MergeSpec(ids=["x", "y"], weights=[1.0, 1.0], merge_strategy="dare_linear", density=0.5)
    g = [dare_generator("k", 0, "q_proj", "a", i) for i in range(2)]
    m0 = merge_tensors([t], torch.tensor([1.0]), spec, g[:1]) != 0
    m1 = merge_tensors([t], torch.tensor([1.0]), spec, g[1:]) != 0
    assert not torch.equal(m0, m1)


def _elect_by_hand(vals: list[float], weights: list[float], method: str) -> float:
    """TIES election and disjoint mean for one coordinate, written out longhand."""
    sgn = [(v > 0) - (v < 0) for v in vals]
    score = sum(vals) if method == "total" else sum(sgn)
    elected = 1 if score >= 0 else -1
    agree = [i for i, s in enumerate(sgn) if s == elected]
    return sum(vals[i] * weights[i] for i in agree) / max(len(agree), 1)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_sign_election_hand_made(method: str) -> None:
    t1 = torch.tensor([[1.0, -2.0, 3.0, 0.0], [4.0, -1.0, -5.0, 2.0]])
    t2 = torch.tensor([[-3.0, 1.0, 1.0, 0.0], [-1.0, -2.0, 6.0, 3.0]])
    t3 = torch.tensor([[-1.0, 1.0, -1.0, 0.5], [1.0, 1.0, -1.0, -7.0]])
    weights = [1.0, 2.0, 0.5]
    spec = MergeSpec(
        ids=["p", "q", "r"],
        weights=weights,
        merge_strategy="dare_ties",
        density=0.5,
        majority_sign_method=method,
    )
    seeds = [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ours = merge_tensors([t1, t2, t3], torch.tensor(weights), spec, gens)
    # Redraw the same masks; dropped entries must not vote, kept ones vote at value/density.
    masks = [torch.rand(t1.shape, generator=torch.Generator().manual_seed(s)) < 0.5 for s in seeds]
    assert any(not m.all() for m in masks) and any(m.any() for m in masks)
    pruned = [(t * m) / 0.5 for t, m in zip((t1, t2, t3), masks, strict=True)]
    for r in range(2):
        for c in range(4):
            want = _elect_by_hand([float(p[r, c]) for p in pruned], weights, method)
            assert float(ours[r, c]) == pytest.approx(want, abs=1e-6), (r, c)


def test_ties_sign_election_hand_made_full_density() -> None:
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 0.0])
    w = torch.tensor([1.0, 2.0])
    total = MergeSpec(ids=["x", "y"], weights=[1.0, 2.0], merge_strategy="ties", density=1.0)
    freq = MergeSpec(
        ids=["x", "y"],
        weights=[1.0, 2.0],
        merge_strategy="ties",
        density=1.0,
        majority_sign_method="frequency",
    )
    assert merge_tensors([t1, t2], w, total).tolist() == [-6.0, -2.0, 2.5, 0.0]
    assert merge_tensors([t1, t2], w, freq).tolist() == [1.0, 2.0, 2.5, 0.0]
    # density 1.0 makes DARE-TIES a plain TIES merge.
    dt = MergeSpec(ids=["x", "y"], weights=[1.0, 2.0], merge_strategy="dare_ties", density=1.0)
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert merge_tensors([t1, t2], w, dt, gens).tolist() == [-6.0, -2.0, 2.5, 0.0]


# ---- spec validation and keys -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(ids=[], weights=[]), "`ids`"),
        (dict(ids=["a", ""], weights=[1.0, 1.0]), "`ids`"),
        (dict(ids=["a", "b"], weights=[]), "`weights`"),
        (dict(ids=["a", "b"], weights=[1.0]), "`ids` and `weights`"),
        (dict(ids=["a", "b"], weights=[1.0, float("nan")]), "`weights`"),
        (dict(ids=["a", "b"], weights=[1.0, float("inf")]), "`weights`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], merge_strategy="slerp"), "`merge_strategy`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], majority_sign_method="max"), "`majority_sign_method`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], density=-0.1), "`density`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], density=1.5), "`density`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], density=float("nan")), "`density`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], merge_strategy="ties", density=0.0), "`density`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], merge_strategy="dare_linear", density=0.0), "`density`"),
        (dict(ids=["a", "b"], weights=[1.0, 1.0], merge_strategy="dare_ties", density=0.0), "`density`"),
        (dict(ids=["a", "__base_model__"], weights=[1.0, 1.0]), "`ids`"),
    ],
)
def test_invalid_specs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as e:
        MergeSpec(**kwargs).validate()
    assert isinstance(e.value, MergeError) and e.value.status_code == 422


def test_valid_edge_specs() -> None:
    MergeSpec(ids=["a", "b"], weights=[1.0, 1.0], density=0.0).validate()  # linear ignores density
    MergeSpec(ids=["a", "a"], weights=[0.5, -0.5], merge_strategy="ties", density=1.0).validate()
    MergeSpec(ids=["a"], weights=[1]).validate()


def test_from_request_applies_lorax_defaults() -> None:
    # What lorax-client's MergedAdapters serialises when only ids/weights/density are set.
    spec = MergeSpec.from_request(
        {
            "ids": ["a", "b"],
            "weights": [1, 0.5],
            "merge_strategy": None,
            "density": 0.5,
            "majority_sign_method": None,
        }
    )
    assert spec == MergeSpec(
        ids=["a", "b"], weights=[1.0, 0.5], merge_strategy="linear", density=0.5, majority_sign_method="total"
    )
    assert MergeSpec.from_request({"ids": ["a", "b"]}).weights == [1.0, 1.0]
    full = {
        "ids": ["a", "b"],
        "weights": [0.3, 0.7],
        "merge_strategy": "dare_ties",
        "density": 0.2,
        "majority_sign_method": "frequency",
    }
    assert MergeSpec.from_request(full) == MergeSpec(**full)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"ids": "a"}, "`ids`"),
        ({"ids": ["a", 3]}, "`ids`"),
        ({"ids": ["a", "b"], "weights": ["x", 1]}, "`weights`"),
        ({"ids": ["a", "b"], "weights": [True, 1]}, "`weights`"),
        ({"ids": ["a", "b"], "density": "0.5"}, "`density`"),
        ({"ids": ["a", "b"], "merge_strategy": "mean"}, "`merge_strategy`"),
        ({"ids": []}, "`ids`"),
        ([], "`merged_adapters`"),
    ],
)
def test_from_request_rejects_bad_json(obj, field: str) -> None:
    with pytest.raises(MergeError, match=field):
        MergeSpec.from_request(obj)


def test_cache_key_is_stable_and_covers_the_spec() -> None:
    base = MergeSpec(ids=["a", "b"], weights=[0.5, 0.5], merge_strategy="ties", density=0.5)
    keys = ["hub:a@rev1", "hub:b@rev1"]
    k = base.cache_key(keys)
    assert k == MergeSpec(ids=["a", "b"], weights=[0.5, 0.5], merge_strategy="ties", density=0.5).cache_key(
        keys
    )
    # Pinned value: the key also seeds DARE, so it must not drift between releases or processes.
    assert k == "merged:3e13c551485d2e6843b4bc9a278500b7768bcdd5b05d9d379c7c5148db45a299"
    variants = [
        (base, ["hub:a@rev2", "hub:b@rev1"]),
        (MergeSpec(ids=["b", "a"], weights=[0.5, 0.5], merge_strategy="ties", density=0.5), keys[::-1]),
        (MergeSpec(ids=["a", "b"], weights=[0.5, 0.5000001], merge_strategy="ties", density=0.5), keys),
        (MergeSpec(ids=["a", "b"], weights=[0.5, 0.5], merge_strategy="ties", density=0.6), keys),
        (
            MergeSpec(
                ids=["a", "b"],
                weights=[0.5, 0.5],
                merge_strategy="ties",
                density=0.5,
                majority_sign_method="frequency",
            ),
            keys,
        ),
        (MergeSpec(ids=["a", "b"], weights=[0.5, 0.5], merge_strategy="dare_ties", density=0.5), keys),
    ]
    assert len({k} | {s.cache_key(rk) for s, rk in variants}) == len(variants) + 1
    # Fields that cannot change a linear merge do not split the cache.
    lin = MergeSpec(ids=["a", "b"], weights=[0.5, 0.5])
    assert lin.cache_key(keys) == MergeSpec(
        ids=["a", "b"], weights=[0.5, 0.5], density=0.3, majority_sign_method="frequency"
    ).cache_key(keys)
    with pytest.raises(ValueError):
        lin.cache_key(["only-one"])
