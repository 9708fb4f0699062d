"""`mlxpost data pairs`: preference pairs from a model's own samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxpost.pairs import best_and_worst
from tests.test_cli import assert_user_error, run_cli


def test_best_and_worst_pairs_spread_rows_only():
    rewards = np.array(
        [
            [0.0, 1.0, 0.0, 1.0],  # best: first 1 (index 1); worst: first 0 (index 0)
            [0.5, 0.5, 0.5, 0.5],  # no spread: no pair
            [0.2, 0.0, 0.3, 0.1],  # spread 0.3 < min_gap 0.5: no pair
            [2.0, -1.0, 0.0, 2.0],
        ]
    )
    assert best_and_worst(rewards, 0.5) == [(0, 1, 0), (3, 0, 1)]
    assert best_and_worst(rewards, 0.1) == [(0, 1, 0), (2, 2, 1), (3, 0, 1)]


LENGTH_REWARD = """
def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]
"""


def test_pairs_command_writes_dpo_data(tmp_path):
    pytest.importorskip("torch")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Tom has {n} apples. He eats 1. How many are left?"}) + "\n"
            for n in (5, 9, 12)
        )
    )
    rewards = tmp_path / "rewards.py"
    rewards.write_text(LENGTH_REWARD)
    output = tmp_path / "pairs.jsonl"
    args = [
        "data",
        "pairs",
        str(prompts),
        "--output",
        str(output),
        "--backend",
        "torch",
        "--rewards",
        f"{rewards}:length",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "16",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert 1 <= len(records) <= 3
    for record in records:
        assert len(record["chosen"]) == record["chosen_reward"]
        assert len(record["rejected"]) == record["rejected_reward"]
        assert record["chosen_reward"] - record["rejected_reward"] >= 0.5
    from mlxpost.data import load_examples

    _, examples = load_examples(str(output), "dpo")
    assert len(examples) == len(records)
    assert examples[0].chosen_messages[-1]["content"] == records[0]["chosen"]
    # an existing file is never overwritten
    before = output.read_text()
    assert_user_error(run_cli(*args), "already exists")
    assert output.read_text() == before
