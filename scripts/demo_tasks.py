"""Offline data for the demo model: a toy English grammar and the three adapter tasks.

Everything is generated from a seed so `make_demo.py` is reproducible without
downloads. Inputs are split into train and held-out by a hash rule (not by RNG
order) so the split is stable no matter how much data a run samples, and the
held-out inputs never appear anywhere in training, not even in the base
model's echo data.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]

TASKS = ("reverse", "upper", "add")
HELD_OUT_MODULUS = 7  # about 1 input in 7 is held out

ADJECTIVES = (
    "big small red blue green old young happy sad quick slow bright dark soft loud "
    "quiet warm cold tall short brave clever lazy busy tiny"
).split()
NOUNS = (
    "cat dog bird fish fox horse cow sheep mouse frog bear wolf duck goat lion tiger "
    "apple ball book tree house river hill road boat car cake lamp door garden window "
    "cloud star moon king queen child farmer baker teacher robot"
).split()
VERBS_PAST = (
    "saw liked found chased helped painted carried watched followed visited kept "
    "opened closed built moved pushed pulled met heard"
).split()
VERBS = "runs jumps sleeps sings swims reads waits plays walks laughs".split()
PLACES = "in the garden|by the river|on the hill|at home|near the road|under the tree".split("|")
ADVERBS = "slowly quickly happily quietly loudly today again".split()
NAMES = "Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Nina Oscar Paul".split()
EXTRA_WORDS = (
    "hello world water paper music light night stone money winter summer garden "
    "yellow purple orange silver planet rocket forest castle dragon monkey pencil "
    "window button guitar coffee sugar butter bottle kitten puppy rabbit turtle "
    "spider candle mirror pillow basket bridge island jungle desert valley ocean "
    "thunder rain snow storm wind flower leaf branch seed grass cheese bread honey "
    "lemon melon cherry grape peach plum carrot potato tomato onion pepper salt "
    "dance smile laugh dream sleep think write speak listen learn teach travel "
    "happy funny quiet strong gentle simple purple golden secret magic little"
).split()


def held_out(text: str) -> bool:
    """Whether an input belongs to the evaluation split (stable across runs and samplers)."""
    return zlib.crc32(text.encode()) % HELD_OUT_MODULUS == 0


def prompt(user_text: str) -> str:
    """The raw prompt the demo uses; identical to the chat template's rendering of one user turn."""
    return f"{USER}{user_text}{ASSISTANT}"


def reverse_answer(text: str) -> str:
    return text[::-1]


def upper_answer(text: str) -> str:
    return text.upper()


def add_answer(text: str) -> str:
    a, b = (int(x) for x in text.split(" + "))
    return str(a + b)


ANSWERS: dict[str, Callable[[str], str]] = {
    "reverse": reverse_answer,
    "upper": upper_answer,
    "add": add_answer,
}


def _random_word(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))


def sample_word(rng: random.Random) -> str:
    """A word for the reverse task: real words and random letter strings (forces real reversal)."""
    pool = NOUNS + ADJECTIVES + EXTRA_WORDS
    return rng.choice(pool) if rng.random() < 0.5 else _random_word(rng)


def sample_phrase(rng: random.Random) -> str:
    """A short lowercase phrase for the upper task."""
    kind = rng.random()
    if kind < 0.2:
        return sample_word(rng)
    if kind < 0.6:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)}"


def sample_sum(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)} + {rng.randint(0, 99)}"


SAMPLERS: dict[str, Callable[[random.Random], str]] = {
    "reverse": sample_word,
    "upper": sample_phrase,
    "add": sample_sum,
}


def sample_input(task: str, rng: random.Random, split: str = "train") -> str:
    """Draw an input of `task` from one split; rejection keeps the hash rule exact."""
    want_held_out = split == "heldout"
    while True:
        text = SAMPLERS[task](rng)
        if held_out(text) != want_held_out:
            continue
        if task == "reverse" and text == text[::-1]:
            continue  # a palindrome would let an echoing model look correct
        return text


def heldout_cases(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct held-out (user text, answer) pairs, the same for a given seed."""
    rng = random.Random(seed * 1000 + TASKS.index(task))
    seen: set[str] = set()
    cases: list[tuple[str, str]] = []
    while len(cases) < n:
        text = sample_input(task, rng, split="heldout")
        if text in seen:
            continue
        seen.add(text)
        cases.append((text, ANSWERS[task](text)))
    return cases


def _sentence(rng: random.Random) -> str:
    """One sentence of the toy grammar; repetitive on purpose so the model is predictable."""
    kind = rng.randrange(6)
    adj, noun, noun2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    if kind == 0:
        s = f"the {adj} {noun} {rng.choice(VERBS_PAST)} the {noun2}"
    elif kind == 1:
        s = f"the {noun} {rng.choice(VERBS)} {rng.choice(PLACES)}"
    elif kind == 2:
        s = f"{rng.choice(NAMES)} {rng.choice(VERBS_PAST)} a {adj} {noun}"
    elif kind == 3:
        s = f"there are {rng.randint(2, 99)} {noun}s {rng.choice(PLACES)}"
    elif kind == 4:
        s = f"a {adj} {noun} {rng.choice(VERBS)} {rng.choice(ADVERBS)}"
    else:
        s = f"{rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(VERBS_PAST)} the {adj} {noun}"
    s = s[0].upper() + s[1:] + "."
    if rng.random() < 0.2:  # shouted prose gives the base a "capitals" mode an adapter can switch on
        s = s.upper()
    return s


def lm_document(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))


def math_document(rng: random.Random) -> str:
    """Sums written out as prose, like the arithmetic a real base model has read.

    The add adapter only has to teach "answer with the sum" in the chat format;
    a rank-16 LoRA cannot learn addition itself in a CPU-minute. Held-out sums
    are left out here too, so the base must generalise to them.
    """
    eqs: list[str] = []
    count = rng.randint(3, 5)
    while len(eqs) < count:
        text = sample_input("add", rng)
        eqs.append(f"{text} = {add_answer(text)}.")
    return " ".join(eqs)


def echo_example(rng: random.Random) -> tuple[str, str]:
    """A chat turn the base model learns: the assistant repeats the user's text.

    This teaches the prompt format, the answer length and EOS, so an adapter
    only has to change *what* is written, never *how* a turn ends.
    """
    r = rng.random()
    if r < 0.3:
        text = sample_input("reverse", rng)
    elif r < 0.6:
        text = sample_input("upper", rng)
    elif r < 0.8:
        text = sample_input("add", rng)
    else:
        text = _sentence(rng)
    return prompt(text), text


def task_example(task: str, rng: random.Random) -> tuple[str, str]:
    text = sample_input(task, rng)
    return prompt(text), ANSWERS[task](text)


def tokenizer_corpus(rng: random.Random, n: int = 3000) -> list[str]:
    """Text the BPE is trained on: grammar text plus a little non-ASCII so multi-byte merges exist."""
    lines = [lm_document(rng) for _ in range(n)]
    lines += ["café naïve déjà vu — “quoted” 10 € 20 °C ✓"] * 50
    lines += [f"{sample_sum(rng)} = ? {prompt(sample_word(rng))}" for _ in range(200)]
    return lines
