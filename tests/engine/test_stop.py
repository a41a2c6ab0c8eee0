"""Stop sequences found incrementally must equal a brute-force search over the whole text."""

from __future__ import annotations

import random

import pytest

from loraserve.engine.stop import StopChecker


def brute_force(text: str, stops: list[str]) -> str | None:
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else None


def run_incremental(deltas: list[str], stops: list[str]) -> tuple[str | None, str | None]:
    """Returns (result via `check` on the growing text, result via stateful `feed`)."""
    checker, feeder = StopChecker(stops), StopChecker(stops)
    text, via_check, via_feed = "", None, None
    for delta in deltas:
        text += delta
        if via_check is None:
            via_check = checker.truncate(text, len(delta))
            cut = checker.check(text, len(delta))
            assert (cut is None) == (via_check is None)
            assert via_check is None or text[:cut] == via_check
        if via_feed is None:
            kept = feeder.feed(delta)
            if kept is not None:
                via_feed = text[: len(text) - len(delta) + kept]
        if via_check is not None and via_feed is not None:
            break
    return via_check, via_feed


def test_stop_spanning_tokens() -> None:
    assert run_incremental(["Hel", "lo wo", "rld", "!!"], ["o w"]) == ("Hello w", "Hello w")
    assert run_incremental(["a", "b", "c", "d"], ["bcd"]) == ("abcd", "abcd")


def test_keeps_stop_and_drops_rest_of_token() -> None:
    assert run_incremental(["one two.", " three"], ["two"]) == ("one two", "one two")


def test_first_completed_stop_wins() -> None:
    # "b" completes before "abc" does, even though "abc" starts earlier.
    assert run_incremental(["xabc"], ["abc", "b"]) == ("xab", "xab")
    assert run_incremental(["xa", "bc"], ["abc", "b"]) == ("xab", "xab")


def test_no_stop() -> None:
    assert run_incremental(["hello", " world"], ["zzz"]) == (None, None)
    assert not StopChecker([])
    assert StopChecker([]).check("anything", 3) is None
    assert StopChecker(["", ""]).feed("x") is None


def test_old_matches_are_not_reported_again() -> None:
    checker = StopChecker(["ab"])
    assert checker.find("ab" + "xyz", 3) is None  # 'ab' was already in the text before the delta


def test_unicode_stop() -> None:
    assert run_incremental(["日本", "語の", "テキスト"], ["語のテ"]) == ("日本語のテ", "日本語のテ")
    assert run_incremental(["ok 😀", "🎉 done"], ["😀🎉"]) == ("ok 😀🎉", "ok 😀🎉")


def test_find_reports_which_stop() -> None:
    match = StopChecker(["\n\n", "User:"]).find("answer\nUser: hi", 9)
    assert match is not None and match.stop == "User:" and match.end == len("answer\nUser:")


@pytest.mark.parametrize("seed", range(20))
def test_random_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abc é😀"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))
    ]
    cuts = (
        sorted(rng.sample(range(1, max(len(text), 2)), k=min(len(text) - 1, rng.randrange(0, 20))))
        if text
        else []
    )
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    expected = brute_force(text, stops)
    assert run_incremental(deltas, stops) == (expected, expected)


def test_scan_is_bounded_by_tail() -> None:
    """The stateful checker keeps only max_len - 1 characters, whatever the generation length."""
    checker = StopChecker(["STOP", "xy"])
    for _ in range(1000):
        assert checker.feed("abcdefgh") is None
    assert len(checker._tail) == 3  # noqa: SLF001
    assert checker.feed("ST") is None
    assert checker.feed("OP and more") == 2


def test_partial_match_len() -> None:
    checker = StopChecker(["</answer>", "\n\n"])
    assert checker.partial_match_len("text </ans") == len("</ans")
    assert checker.partial_match_len("text\n") == 1
    assert checker.partial_match_len("text") == 0
    assert checker.partial_match_len("") == 0
