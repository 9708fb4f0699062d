"""mlxpost distill: trace SFT and logit distillation through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def traces(path, count=12):
    with open(path, "w") as f:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"What is {i} + 2?"},
                {
                    "role": "assistant",
                    "content": f"<think>\n{i} + 2 = {i + 2}\n</think>\n#### {i + 2}",
                },
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def distill(model, data, output, *extra):
    args = [
        sys.executable,
        "-m",
        "mlxpost.cli",
        "distill",
        "--model",
        str(model),
        "--data",
        str(data),
        "--eval-data",
        str(data),
    ]
    args += [
        "--output",
        str(output),
        "--backend",
        "torch",
        "--batch-size",
        "4",
        "--eval-math",
        "0",
        "--eval-text",
        "0",
        "--eval-every",
        "0",
        *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_equal_to_the_student_gives_zero_divergence(tiny_dir, tmp_path, divergence):
    model = tiny_dir / "tiny-gpt2"
    result = distill(
        model,
        traces(tmp_path / "t.jsonl"),
        tmp_path / "run",
        "--teacher",
        str(model),
        "--divergence",
        divergence,
        "--steps",
        "1",
    )
    assert result.returncode == 0, result.stderr
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    # LoRA starts with B = 0: the student is the teacher, so every divergence is 0.
    assert first["step"] == 1 and abs(first["divergence"]) < 1e-6
    assert first["nll"] > 0.1


def test_trace_sft_lowers_the_loss(tiny_dir, tmp_path):
    result = distill(
        tiny_dir / "tiny-gpt2",
        traces(tmp_path / "t.jsonl"),
        tmp_path / "run",
        "--steps",
        "12",
        "--learning-rate",
        "3e-3",
    )
    assert result.returncode == 0, result.stderr
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_teacher_with_another_tokenizer_is_refused(tiny_dir, tiny_builder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((tiny_dir / "tiny-gpt2" / name).read_bytes())
    tiny_builder.build_tokenizer(vocab_size=300).save_pretrained(str(other))
    result = distill(
        tiny_dir / "tiny-gpt2",
        traces(tmp_path / "t.jsonl"),
        tmp_path / "run",
        "--teacher",
        str(other),
        "--steps",
        "1",
    )
    assert result.returncode == 2
    assert "tokenizer differs" in result.stderr.strip().splitlines()[-1]
