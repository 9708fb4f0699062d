"""Reward functions: built-ins, user functions, and failures reported instead of crashing."""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.errors import UserError
from mlxpost.rewards import (
    RewardSet,
    answer_format,
    load_reward,
    math_correctness,
    repetition_penalty,
)


def test_math_correctness_tolerates_formatting():
    completions = ["3 + 4 = 7\n#### 7", "The answer is 7.0", "#### 1,007", "#### 8", "no number"]
    assert math_correctness(None, completions, answer_number=["7", "7", "1007", "7", "7"]) == [
        1,
        1,
        1,
        0,
        0,
    ]


def test_format_and_repetition():
    assert answer_format(None, ["x\n#### 12", "#### ", "12"]) == [1.0, 0.0, 0.0]
    looping = "a b c a b c a b c"
    assert repetition_penalty(None, [looping, "one two three four"]) == [pytest.approx(-4 / 7), 0.0]


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **cols):\n    return [len(c) for c in completions]\n"
    )
    fn = load_reward(f"{tmp_path / 'my_rewards.py'}:length")
    assert fn(["p"], ["abc"]) == [3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown reward"),
        ("/no/file.py:f", "not found"),
        ("math_module_missing:f", "cannot import"),
        ("json:no_such_fn", "no function"),
    ],
)
def test_bad_reward_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward(spec)


def test_weights_and_a_failing_function(tmp_path):
    (tmp_path / "bad.py").write_text(
        "def picky(prompts, completions, **cols):\n"
        "    return [1.0 / (len(c) - 3) for c in completions]\n"  # fails on a 3-character completion
    )
    rewards = RewardSet.parse(f"format,{tmp_path / 'bad.py'}:picky", "2,1")
    warnings = []
    totals, metrics = rewards.score(["p1", "p2"], ["#### 5", "abc"], {}, warnings.append)
    np.testing.assert_allclose(totals, [2.0, 0.0])  # picky's rewards count as 0 for the batch
    assert (
        metrics["reward/format"] == 0.5
        and metrics[f"reward_errors/{tmp_path / 'bad.py'}:picky"] == 1.0
    )
    assert (
        len(warnings) == 1 and "first failing example 1" in warnings[0] and "'abc'" in warnings[0]
    )


def test_reward_weights_must_match():
    with pytest.raises(UserError, match="2 values for 1 rewards"):
        RewardSet.parse("math", "1,2")
