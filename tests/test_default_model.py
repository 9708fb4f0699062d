"""The bundled default model: what ships, and that its builder is reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mlxpost.assets import DEFAULT_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_model_is_small_and_complete():
    names = set(os.listdir(DEFAULT_MODEL))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "build.json",
    } <= names
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, n)) for n in names)
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    build = json.loads(open(os.path.join(DEFAULT_MODEL, "build.json")).read())
    # pre-trained to answer some but far from all held-out problems: room for post-training
    assert 0.10 <= build["held_out_accuracy"] <= 0.50


def test_bundled_tokenizer():
    from mlxpost.tokenizer import load_tokenizer

    info = load_tokenizer(DEFAULT_MODEL)
    tokenizer = info.tokenizer
    assert tokenizer.decode(info.eos_ids) == "<|end|>"
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert len(digits) == 5, "digits are tokenised one by one"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def digests(directory):
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def test_builder_is_deterministic(tmp_path):
    pytest.importorskip("torch")
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        command = [
            sys.executable,
            os.path.join(ROOT, "scripts", "build_default_model.py"),
            "--steps",
            "2",
            "--eval-limit",
            "0",
            "--direct-share",
            "0.5",
            "--output",
            str(out),
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(digests(out))
    assert outputs[0] == outputs[1]


def test_answer_only_keeps_the_final_line():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    pytest.importorskip("torch")
    from build_default_model import answer_only

    solution = "Mia has 5 * 12 = 60 crayons.\nMia has 60 - 37 = 23 crayons.\n#### 23"
    assert answer_only(solution) == "#### 23"
    assert answer_only("#### 7\n") == "#### 7"
