"""DPO and reward-model training on both backends: same seed, float32, same data -> same losses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxpost import assets

# Per-step losses may differ by float32 rounding only, the SFT parity test's 1e-5 relative.
# DPO sits closer to it than SFT (measured 4e-7): its loss is a function of
# h = (logp_c - ref_c) - (logp_r - ref_r), a small difference of sequence logprob sums
# (~ -50 to -150 here) that the backends compute to ~2e-7 relative (measured), i.e. ~3e-5
# absolute. h inherits that absolute error, the loss about beta / 2 of it (~1.5e-6 on a loss
# of 0.5 to 0.7), and 20 AdamW steps compound it: measured max 5.3e-6 relative, mean 1.5e-6
# (one reward-model step: 3.8e-7). A real difference in the math (a wrong reduction, a
# missing term, another reference) moves the losses by orders of magnitude more.
RTOL = 1e-5
STEPS, BATCH = 20, 4


@pytest.fixture
def pairs_file(tmp_path):
    """STEPS * BATCH pairs of the bundled preference data (all three kinds), short enough for
    the tiny tokenizer's 128 tokens (79 of 80 fit), so 20 steps see about each pair once."""
    lines = []
    with open(assets.default_data("dpo")) as f:
        for line in f:
            row = json.loads(line)
            if len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"])) <= 150:
                lines.append(line)
            if len(lines) == STEPS * BATCH:
                break
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(lines))
    return str(path)


def step_metrics(output) -> list[dict]:
    with open(output / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def test_dpo_losses_agree_for_20_steps(tiny_dir, backends, tmp_path, pairs_file):
    from mlxpost.algorithms.dpo import DPO
    from mlxpost.algorithms.preference import DPOConfig
    from mlxpost.loop import setup, train

    rows = {}
    for backend in ("torch", "mlx"):
        cfg = DPOConfig(
            backend=backend,
            model=str(tiny_dir / "tiny-gpt2"),
            data=pairs_file,  # no --eval-data: evaluation is off
            output=str(tmp_path / backend),
            steps=STEPS,
            batch_size=BATCH,
            learning_rate=1e-3,
            max_length=128,
            eval_every=0,
            save_every=0,
        )
        session = setup("dpo", cfg)
        train(session, DPO(session, cfg))
        rows[backend] = step_metrics(tmp_path / backend)
    assert len(rows["torch"]) == STEPS
    losses = {name: np.array([row["loss"] for row in rows[name]]) for name in rows}
    diff = np.abs(losses["torch"] - losses["mlx"]) / np.abs(losses["torch"])
    assert diff.max() <= RTOL, f"max relative diff {diff.max():.3g}, mean {diff.mean():.3g}"
    # The implicit reward margin beta * h adds four sequence logprob sums, each ~3e-5 off in
    # absolute terms (see RTOL), so margins agree in absolute terms, to beta * 4 * 3e-5 at
    # worst (measured max 7e-6); relative to a margin near 0 they do not.
    margins = {name: np.array([row["reward_margin"] for row in rows[name]]) for name in rows}
    np.testing.assert_allclose(margins["mlx"], margins["torch"], rtol=0, atol=0.1 * 1.2e-4)
    # accuracy counts h > 0: at step 1 h is rounding noise around 0 (policy == reference)
    accuracy = {name: [row["accuracy"] for row in rows[name]] for name in rows}
    assert accuracy["mlx"][1:] == accuracy["torch"][1:]
    assert losses["torch"][0] == pytest.approx(np.log(2), rel=1e-5)  # policy == reference
    assert losses["torch"][-5:].mean() < losses["torch"][:5].mean(), "DPO did not lower the loss"


def test_one_reward_model_step_agrees(tiny_dir, backends, tmp_path, pairs_file):
    from mlxpost.algorithms.rm import RewardModel, RMConfig
    from mlxpost.loop import setup, train

    rows = {}
    for backend in ("torch", "mlx"):
        cfg = RMConfig(
            backend=backend,
            model=str(tiny_dir / "tiny-gpt2"),
            data=pairs_file,
            output=str(tmp_path / backend),
            steps=1,
            batch_size=BATCH,
            learning_rate=1e-3,
            max_length=128,
            eval_every=0,
            save_every=0,
        )
        session = setup("rm", cfg, scalar_head=True)
        train(session, RewardModel(session, cfg))
        rows[backend] = step_metrics(tmp_path / backend)[0]
    torch_row, mlx_row = rows["torch"], rows["mlx"]
    assert mlx_row["loss"] == pytest.approx(torch_row["loss"], rel=RTOL)
    assert mlx_row["accuracy"] == torch_row["accuracy"]
    for key in ("margin", "reward_mean", "grad_norm"):
        assert mlx_row[key] == pytest.approx(torch_row[key], rel=RTOL, abs=1e-6), key
