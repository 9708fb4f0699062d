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
    # The batched call fails; alone, the first completion scores 1/3 and only "abc" counts 0.
    np.testing.assert_allclose(totals, [2.0 + 1.0 / 3.0, 0.0])
    assert (
        metrics["reward/format"] == 0.5
        and metrics[f"reward_errors/{tmp_path / 'bad.py'}:picky"] == 1.0
        and metrics["reward_errors/format"] == 0.0
    )
    assert (
        len(warnings) == 1
        and "failed on 1 of 2" in warnings[0]
        and "first failing example 1" in warnings[0]
        and "'abc'" in warnings[0]
    )


BROKEN_REWARDS = {
    "raises": "    raise RuntimeError('no scorer')\n",
    "wrong_length": "    return [1.0] * (len(completions) + 1)\n",
    "nan": "    return [float('nan')] * len(completions)\n",
    "strings": "    return ['good'] * len(completions)\n",
}


@pytest.mark.parametrize("kind", sorted(BROKEN_REWARDS))
def test_a_reward_failing_on_every_completion_stops_scoring(tmp_path, kind):
    (tmp_path / "broken.py").write_text(
        "def bad(prompts, completions, **cols):\n" + BROKEN_REWARDS[kind]
    )
    rewards = RewardSet.parse(f"{tmp_path / 'broken.py'}:bad", None)
    warnings = []
    with pytest.raises(UserError, match="failed on 3 of 3 completions; first failing example 0"):
        rewards.score(["p"] * 3, ["a", "bb", "ccc"], {}, warnings.append)
    if kind == "raises":  # the user's own traceback is shown, without mlxpost's frames
        assert "broken.py" in warnings[0] and "RuntimeError: no scorer" in warnings[0]
        assert "rewards.py" not in warnings[0]


def test_failure_share_sets_when_scoring_stops(tmp_path):
    (tmp_path / "half.py").write_text(
        "def half(prompts, completions, **cols):\n"
        "    return [1.0 if len(c) % 2 else float('nan') for c in completions]\n"
    )
    spec = f"{tmp_path / 'half.py'}:half"
    completions = ["a", "bb", "ccc", "dddd"]
    totals, metrics = RewardSet.parse(spec, None).score(["p"] * 4, completions, {}, print)
    np.testing.assert_array_equal(totals, [1.0, 0.0, 1.0, 0.0])
    assert metrics[f"reward_errors/{spec}"] == 2.0
    with pytest.raises(UserError, match="failed on 2 of 4"):
        RewardSet.parse(spec, None, failure_share=0.5).score(["p"] * 4, completions, {}, print)


@pytest.mark.parametrize(
    "source, message",
    [
        ("def f(:\n", "line 1: reward .* does not parse"),
        (
            "raise ValueError('boom')\n",
            "importing .* raised ValueError: boom at .*bad_import.py, line 1",
        ),
    ],
)
def test_reward_files_that_fail_to_import(tmp_path, source, message):
    (tmp_path / "bad_import.py").write_text(source)
    with pytest.raises(UserError, match=message):
        load_reward(f"{tmp_path / 'bad_import.py'}:f")


def test_reward_weights_must_match():
    with pytest.raises(UserError, match="2 values for 1 rewards"):
        RewardSet.parse("math", "1,2")
    with pytest.raises(UserError, match="expected comma-separated numbers"):
        RewardSet.parse("math,format", "1,x")
