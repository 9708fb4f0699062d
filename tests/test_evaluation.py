"""`mlxpost eval`: perplexity and repetition figures against hand computations, and the
command line (--json per task, --compare, bad input) on tiny random checkpoints (torch)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mlxpost.assets import DATA
from mlxpost.evaluation import (
    LOOP_REPEAT_RATE,
    PerplexityConfig,
    evaluate_perplexity,
    lm_examples,
    repeat_rate,
    repetition_metrics,
)

TEXT_DATA = f"{DATA}/text/test.jsonl"


@pytest.fixture(scope="session")
def backend():
    pytest.importorskip("torch")
    from mlxpost.backend import get_backend

    return get_backend("torch")


@pytest.fixture(scope="session")
def gpt2(tiny_dir):
    return str(tiny_dir / "tiny-gpt2")


def load(backend, path):
    from mlxpost.tokenizer import load_tokenizer

    return backend.load_model(path), load_tokenizer(path)


def render(tokenizer, messages, add_generation_prompt=False):
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", "eval", "--backend", "torch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


# ---- repetition figures (pure) ----


def test_repetition_metrics_on_known_texts():
    texts = ["the cat sat on the mat", "the cat the cat the cat", ""]
    metrics = repetition_metrics(texts)
    # 12 words, 5 distinct (the, cat, sat, on, mat).
    assert metrics["distinct_1"] == pytest.approx(5 / 12)
    # 5 + 5 bigrams; distinct: the-cat, cat-sat, sat-on, on-the, the-mat, cat-the.
    assert metrics["distinct_2"] == pytest.approx(6 / 10)
    # 3-grams repeated: 0 of 4, 2 of 4 (the-cat-the, cat-the-cat twice each), none in "".
    assert metrics["repeated_3gram_rate"] == pytest.approx((0 + 0.5 + 0) / 3)
    # Only the second loops: 1 of its 3 4-grams repeats, 1/3 > 0.3.
    assert metrics["non_repetition"] == pytest.approx(2 / 3)
    assert metrics["mean_words"] == pytest.approx(4.0)


def test_repeat_rate_and_loop_threshold():
    assert repeat_rate("a b c a b c".split(), 3) == pytest.approx(1 / 4)  # abc bca cab abc
    assert repeat_rate("a b".split(), 3) == 0.0  # too short to have a 3-gram
    # 10 4-grams of which 3 repeat: exactly the threshold, which is not a loop.
    words = "a b c d e f a b c d e f g".split()
    assert repeat_rate(words, 4) == pytest.approx(LOOP_REPEAT_RATE)
    assert repetition_metrics([" ".join(words)])["non_repetition"] == 1.0
    assert repetition_metrics(["x " * 20])["non_repetition"] == 0.0


def test_distinct_pools_ngrams_across_texts():
    # Each text alone is fully distinct; together they repeat every word.
    metrics = repetition_metrics(["a b", "a b"])
    assert metrics["distinct_1"] == pytest.approx(2 / 4)
    assert metrics["distinct_2"] == pytest.approx(1 / 2)


# ---- perplexity ----


def hand_nll(backend, model, rows):
    """Summed NLL and token count of (ids, counted positions) rows, one unpadded row at a time."""
    total, count = 0.0, 0
    for ids, positions in rows:
        ids = np.array([ids], np.int32)
        logprobs = backend.logprobs(model, ids, np.ones_like(ids))[0]
        total -= float(np.sum(logprobs[positions].astype(np.float64)))
        count += len(positions)
    return total, count


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_text_perplexity_is_exp_of_hand_computed_nll(backend, tiny_dir, tmp_path, arch):
    path = str(tiny_dir / f"tiny-{arch}")
    model, info = load(backend, path)
    texts = ["The quick brown fox.", "Tom has 3 apples and buys 4 more apples today.", "Hi"]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    # Batches of 2 put padding next to the longest row: it must not count.
    report = evaluate_perplexity(
        backend, model, info, lm_examples(data), PerplexityConfig(batch_size=2, max_length=128)
    )
    rows = []
    for text in texts:
        # The tokenizer's own encoding: with its BOS where it adds one (Gemma's does).
        ids = info.tokenizer(text)["input_ids"] + info.eos_ids[:1]
        rows.append((ids, list(range(1, len(ids)))))  # every token but the first
    total, count = hand_nll(backend, model, rows)
    assert report["n"] == 3 and report["tokens"] == count
    assert report["nll"] == pytest.approx(total / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_completion_perplexity_counts_completion_tokens_only(backend, gpt2, tmp_path):
    model, info = load(backend, gpt2)
    pairs = [("Add 3 and 4.", "The answer is 7."), ("Summarise the text.", "A short summary.")]
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    report = evaluate_perplexity(
        backend, model, info, lm_examples(data), PerplexityConfig(max_length=128)
    )
    rows = []
    for prompt, completion in pairs:
        messages = [{"role": "user", "content": prompt}]
        head = render(info.tokenizer, messages, add_generation_prompt=True)
        full = render(info.tokenizer, messages + [{"role": "assistant", "content": completion}])
        assert full[: len(head)] == head
        rows.append((full, list(range(len(head), len(full)))))
    total, count = hand_nll(backend, model, rows)
    assert report["tokens"] == count
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_long_text_is_cut_to_the_model_positions(backend, gpt2, tmp_path):
    from mlxpost.model_dir import max_positions, read_config

    model, info = load(backend, gpt2)
    limit = max_positions(read_config(gpt2))
    assert limit == 128  # n_positions of the tiny GPT-2
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": "apples and dogs " * 60}])
    report = evaluate_perplexity(
        backend, model, info, lm_examples(data), PerplexityConfig(max_length=limit)
    )
    assert report["truncated"] == 1 and report["tokens"] == limit - 1


def test_untrained_model_perplexity_is_of_the_vocabulary_order(backend, gpt2):
    # Small random weights give near-uniform next-token distributions, so the perplexity
    # must be close to the vocabulary size read from the config, not from the evaluator.
    vocab = json.loads(open(f"{gpt2}/config.json").read())["vocab_size"]
    model, info = load(backend, gpt2)
    report = evaluate_perplexity(
        backend, model, info, lm_examples(TEXT_DATA, 16), PerplexityConfig(max_length=128)
    )
    assert report["tokens"] > 100
    assert vocab / 4 < report["perplexity"] < vocab * 4


# ---- command line ----


@pytest.mark.parametrize(
    ("task", "figure", "extra"),
    [
        ("math", "accuracy", ["--max-new-tokens", "8"]),
        ("perplexity", "perplexity", []),
        ("repetition", "distinct_2", ["--max-new-tokens", "8"]),
    ],
)
def test_json_prints_one_object(gpt2, task, figure, extra):
    result = run_cli("--task", task, "--model", gpt2, "--limit", "2", "--json", *extra)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout: one object, nothing else
    assert report["task"] == task and report["n"] == 2
    assert isinstance(report[figure], float)


def test_human_output_of_perplexity(gpt2):
    result = run_cli("--task", "perplexity", "--model", gpt2, "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("perplexity ") and "on 2 examples" in result.stdout


@pytest.fixture(scope="session")
def adapter(backend, gpt2, tmp_path_factory):
    """A LoRA adapter on tiny GPT-2 with non-zero B, so it changes the outputs."""
    from mlxpost.backend import LoraConfig

    model = backend.load_model(gpt2)
    backend.attach_lora(model, LoraConfig(rank=2, alpha=4.0))
    rng = np.random.default_rng(0)
    params = backend.parameters(model, trainable_only=True)
    backend.set_parameters(
        model,
        {
            name: rng.normal(0, 0.5, value.shape).astype(np.float32)
            for name, value in params.items()
        },
    )
    directory = tmp_path_factory.mktemp("adapter")
    backend.save_adapter(model, str(directory))
    return str(directory)


def test_compare_json_loads_each_entry_afresh(backend, gpt2, adapter, tmp_path):
    model, info = load(backend, gpt2)
    alone = evaluate_perplexity(
        backend, model, info, lm_examples(TEXT_DATA, 3), PerplexityConfig(max_length=128)
    )
    result = run_cli(
        "--task", "perplexity", "--model", gpt2, "--limit", "3", "--json",
        "--compare", f"{adapter},{gpt2}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["task"] == "perplexity"
    assert [e["entry"] for e in out["entries"]] == [adapter, gpt2]
    with_adapter, plain = (e["perplexity"] for e in out["entries"])
    # The adapter of the first entry must not stay on the model of the second.
    assert plain == pytest.approx(alone["perplexity"], rel=1e-6)
    assert abs(with_adapter - plain) > 1e-3 * plain
    chart = tmp_path / "eval-compare-perplexity.png"  # the default, in the working directory
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_compare_table_and_chart(gpt2, adapter, tmp_path):
    chart = tmp_path / "chart.png"
    result = run_cli(
        "--task", "repetition", "--model", gpt2, "--limit", "2", "--max-new-tokens", "6",
        "--compare", f"{gpt2},{adapter}", "--chart", str(chart),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == [
        "entry", "distinct_1", "distinct_2", "repeated_3gram_rate", "non_repetition", "mean_words",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == [gpt2, adapter]
    assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--task", "perplexity", "--data", "{tmp}/nope.jsonl"], "nope.jsonl: not found"),
        (["--task", "perplexity", "--compare", "{model},{tmp}/nope"], "entry not found"),
        (["--task", "perplexity", "--temperature", "0.5"], "--temperature does not apply"),
    ],
)
def test_bad_input_exits_2_with_one_line(gpt2, tmp_path, args, fragment):
    args = [a.format(tmp=tmp_path, model=gpt2) for a in args]
    result = run_cli("--model", gpt2, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert result.stdout == ""
