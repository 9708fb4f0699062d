import pytest

from mlxpost.answers import extract_answer, is_correct, normalise_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Tom has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("so 5 + 5 = 10\n#### 10.0", "10"),
        ("The answer is 42.", "42"),
        ("the answer is: $15", "15"),
        ("I think it is 3, no wait, 8", "8"),
        ("#### 12 and later 99", "12"),
        ("The answer is 5. #### 6", "6"),
        ("negative: #### -4", "-4"),
        ("no digits here", None),
        ("0.50 dollars", "0.5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalise_number():
    assert normalise_number("3.000") == "3"
    assert normalise_number("1,000.25") == "1000.25"
    assert normalise_number("abc") is None


def test_is_correct():
    assert is_correct("12 + 7 = 19\n#### 19", "19")
    assert is_correct("The answer is 19.0", "19")
    assert not is_correct("#### 18", "19")
    assert not is_correct("nothing", "19")


def test_reasoning_stats():
    from mlxpost.evaluation import reasoning_stats

    texts = [
        "<think>\na + b = c\nCheck: ok\n</think>\nThe answer is 3.",
        "#### 4",
        "<think>one two three</think> 5",
    ]
    stats = reasoning_stats(texts)
    assert stats["think_share"] == 2 / 3
    assert stats["mean_think_words"] == (7 + 3) / 2
    assert stats["mean_think_steps"] == (2 + 1) / 2
    assert reasoning_stats([]) == {
        "think_share": 0.0,
        "mean_think_words": 0.0,
        "mean_think_steps": 0.0,
    }
