"""Every supported architecture trains through every training command, in both backends.

The tiny checkpoints of scripts/build_tiny_models.py run `sft`, `rm`, `dpo`, `grpo` and
`ppo` for two steps each, in process (one model load per command, no interpreter start), and
an adapter trained on each gives the same perplexity in peft/transformers as in mlxpost.
Numerical agreement between the backends is parity_tests/' business; this file checks that
nothing in the commands is specific to GPT-2 or Gemma-2.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner

from mlxpost.assets import default_data

pytest.importorskip("torch")

ARCHITECTURES = ["gpt2", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]
BACKENDS = ["torch", "mlx"]
COMMON = ["--steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "0"]
COMMANDS = {
    # A large step, so the adapter moves the perplexity and the peft check below can fail.
    "sft": [
        "--eval-math",
        "0",
        "--eval-text",
        "0",
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "0",
    ],
    "rm": [],
    "dpo": [],
    "grpo": ["--num-generations", "2", "--max-new-tokens", "6", "--eval-math", "0"],
    "ppo": ["--num-generations", "2", "--max-new-tokens", "6", "--eval-math", "0"],
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, str]:
    """The first 16 examples of each command's bundled data (the whole files take minutes to
    tokenize and score on MLX's Linux CPU build)."""
    root = tmp_path_factory.mktemp("small-data")
    paths = {}
    for command in [*COMMANDS, "text-eval"]:
        first = default_data(command).split(",")[0]  # rm's default is two files
        with open(first, encoding="utf-8") as f:
            lines = [next(f) for _ in range(16)]
        paths[command] = str(root / f"{command}.jsonl")
        with open(paths[command], "w", encoding="utf-8") as f:
            f.writelines(lines)
    return paths


def invoke(*args: str):
    from mlxpost.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_training_command_runs(arch, backend, tiny_dir, small_data, tmp_path):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = str(tiny_dir / f"tiny-{arch}")
    for command, extra in COMMANDS.items():
        out = tmp_path / command
        result = invoke(
            command,
            *("--model", model, "--data", small_data[command], "--backend", backend),
            *("--output", str(out), *COMMON, *extra),
        )
        assert result.exit_code == 0, f"{command}: {result.output[-2000:]}"
        rows = [row for row in read_metrics(out) if "loss" in row]
        assert [row["step"] for row in rows] == [1, 2], command
        assert all(math.isfinite(row["loss"]) for row in rows), (command, rows)
        assert all(row["peak_memory_gb"] > 0 for row in rows), (command, rows)
        assert (out / "final" / "adapter_model.safetensors").is_file(), command
        if command == "sft":
            check_perplexity_in_peft(model, backend, str(out / "final"), small_data["text-eval"])


def check_perplexity_in_peft(model: str, backend: str, adapter: str, texts: str) -> None:
    """`mlxpost eval --task perplexity` of base + adapter equals peft's on the same tokens."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlxpost.evaluation import lm_examples, tokenize_for_perplexity
    from mlxpost.tokenizer import load_tokenizer

    result = invoke(
        "eval",
        *("--task", "perplexity", "--model", model, "--adapter", adapter),
        *("--data", texts, "--backend", backend, "--json"),
    )
    assert result.exit_code == 0, result.output[-2000:]
    ours = json.loads(result.stdout)
    tokenized, _ = tokenize_for_perplexity(
        lm_examples(texts, None), load_tokenizer(model).tokenizer, ours["max_length"]
    )
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()

    def mean_nll():
        total, count = 0.0, 0
        with torch.no_grad():
            for example in tokenized:
                ids = torch.tensor([example.input_ids])
                logits = peft_model(input_ids=ids).logits[0, :-1].double()
                nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
                mask = np.asarray(example.loss_mask[1:], dtype=bool)
                total, count = total + nll[mask].sum(), count + int(mask.sum())
        assert count == ours["tokens"]
        return total / count

    theirs = mean_nll()
    assert abs(theirs - ours["nll"]) <= 1e-5 * abs(ours["nll"]), (theirs, ours)
    with peft_model.disable_adapter():
        assert abs(mean_nll() - ours["nll"]) > 1e-3 * abs(ours["nll"]), "the adapter is a no-op"
