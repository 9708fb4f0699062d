"""`mlxpost rm` and `mlxpost dpo` end to end on the tiny model (torch backend, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

# Short texts: the tiny tokenizer spends about one token per two or three characters.
PAIRS = [
    {"prompt": "2+2?", "chosen": "4.", "rejected": "5.", "margin": 1.0},
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "3+1?", "chosen": "4.", "rejected": "9."},
    {"prompt": "Thanks", "chosen": "Welcome!", "rejected": "Whatever."},
    {"prompt": "1+1?", "chosen": "2.", "rejected": "3."},
    {"prompt": "Bye", "chosen": "Bye!", "rejected": "Finally."},
]
UNPAIRED = [
    {"prompt": "2+2?", "completion": "4.", "label": True},
    {"prompt": "Hi", "completion": "Go away.", "label": False},
    {"prompt": "3+1?", "completion": "4.", "label": True},
    {"prompt": "Thanks", "completion": "Whatever.", "label": False},
    {"prompt": "1+1?", "completion": "3.", "label": False},
    {"prompt": "Bye", "completion": "Bye!", "label": True},
]
FAST = ["--backend", "torch", "--batch-size", "4", "--max-length", "128", "--eval-every", "0"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def mlxpost(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def step_rows(output):
    with open(output / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if "loss" in row]


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


@pytest.mark.parametrize("mode", ["--lora", "--full"])
def test_reward_model_saves_and_scores_the_same(tiny_dir, tmp_path, pairs, mode):
    from mlxpost.backend import get_backend
    from mlxpost.data import load_examples
    from mlxpost.reward_model import load_reward_model, score_texts

    model, out = tiny_dir / "tiny-gpt2", tmp_path / "rm"
    result = mlxpost(
        "rm",
        "--model",
        model,
        "--data",
        pairs,
        "--eval-data",
        pairs,
        "--output",
        out,
        "--steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--centring-coef",
        "0.01",
        mode,
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    final = out / "final"
    for name in ("trainable.npz", "optimizer.npz", "state.json", "reward_model.json"):
        assert (final / name).is_file(), name
    if mode == "--lora":  # the adapter is there for PEFT users; the head is in trainable.npz
        assert (final / "adapter_config.json").is_file()
        assert (final / "adapter_model.safetensors").is_file()
    else:
        assert (final / "model.safetensors").is_file()
    info = json.loads((final / "reward_model.json").read_text())
    assert info["kind"] == "reward_model" and info["lora"] == (mode == "--lora")
    assert info["base_model"] == str(model)
    assert [row["step"] for row in step_rows(out)] == [1, 2]
    assert {"accuracy", "margin", "reward_mean", "bt_loss"} <= set(summary)

    # Loaded afresh, the reward model gives the scores the final evaluation measured.
    backend = get_backend("torch")
    reward_model, reward_info = load_reward_model(backend, str(final))
    _, examples = load_examples(pairs, "rm")
    prompts = [ex.prompt_messages for ex in examples]
    chosen = score_texts(
        backend, reward_model, reward_info, prompts, [ex.chosen_messages for ex in examples]
    )
    rejected = score_texts(
        backend, reward_model, reward_info, prompts, [ex.rejected_messages for ex in examples]
    )
    assert chosen.mean() == pytest.approx(summary["eval_reward_chosen"], rel=1e-5, abs=1e-6)
    assert rejected.mean() == pytest.approx(summary["eval_reward_rejected"], rel=1e-5, abs=1e-6)
    assert np.mean(chosen > rejected) == pytest.approx(summary["eval_accuracy"])

    if mode == "--lora":  # and `mlxpost eval --task reward` reads the same figures
        result = mlxpost(
            "eval",
            "--task",
            "reward",
            "--reward-model",
            final,
            "--model",
            model,
            "--data",
            pairs,
            "--backend",
            "torch",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["pairwise_accuracy"] == pytest.approx(summary["eval_accuracy"])
        assert report["chosen_mean_score"] == pytest.approx(chosen.mean(), rel=1e-5, abs=1e-6)


def dpo_run(tiny_dir, out, data, *extra):
    return mlxpost(
        "dpo",
        "--model",
        tiny_dir / "tiny-gpt2",
        "--data",
        data,
        "--output",
        out,
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "0",
        *FAST,
        *extra,
    )


def test_dpo_reference_modes_agree(tiny_dir, tmp_path, pairs):
    losses = {}
    for mode in ("precompute", "live"):
        out = tmp_path / mode
        result = dpo_run(
            tiny_dir, out, pairs, "--eval-data", pairs, "--steps", "2", "--reference-mode", mode
        )
        assert result.returncode == 0, result.stderr
        rows = step_rows(out)
        losses[mode] = [row["loss"] for row in rows]
        assert {"accuracy", "reward_margin", "reward_chosen", "logp_chosen"} <= set(rows[0])
        summary = json.loads(result.stdout)
        assert 0.0 <= summary["eval_accuracy"] <= 1.0 and "eval_reward_margin" in summary
        assert (out / "final" / "adapter_model.safetensors").is_file()
    # step 1: policy == reference, so the loss is log 2 either way; step 2 follows one
    # update, with the reference recomputed each step (live) or read from the cache
    assert losses["precompute"][0] == pytest.approx(losses["live"][0], rel=1e-5)
    assert losses["precompute"][0] == pytest.approx(np.log(2), rel=1e-5)
    assert losses["precompute"][1] == pytest.approx(losses["live"][1], rel=1e-5)
    assert losses["precompute"][1] < np.log(2)


def test_kto_on_unpaired_data(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "unpaired.jsonl", UNPAIRED)
    out = tmp_path / "kto"
    result = dpo_run(
        tiny_dir,
        out,
        data,
        "--eval-data",
        data,
        "--loss",
        "kto",
        "--steps",
        "2",
        "--undesirable-weight",
        "1.0",
    )
    assert result.returncode == 0, result.stderr
    assert "3 desirable, 3 undesirable" in result.stderr
    rows = step_rows(out)
    assert len(rows) == 2 and all(row["kl"] >= 0 for row in rows)
    assert {"reward_desirable", "reward_undesirable"} <= set(rows[0])
    summary = json.loads(result.stdout)
    assert np.isfinite(summary["eval_loss"]) and "eval_kl" in summary


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_missing_chosen_column_exits_2(tiny_dir, tmp_path, command):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": row["prompt"], "rejected": row["rejected"]} for row in PAIRS],
    )
    result = mlxpost(
        command,
        "--model",
        tiny_dir / "tiny-gpt2",
        "--data",
        data,
        "--output",
        tmp_path / "run",
        "--steps",
        "1",
        *FAST,
    )
    assert result.returncode == 2, result.stderr
    assert "missing column" in result.stderr and "chosen" in result.stderr
    assert "Traceback" not in result.stderr
