"""The bundled synthetic datasets: rebuilt byte for byte from the default seed, and well formed.

The math checks re-derive every solution with Python's own arithmetic rather than the
generator's, so a bug in the generator cannot vouch for itself.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "mlxpost" / "assets" / "data"
BUILDER = ROOT / "scripts" / "build_datasets.py"
sys.path.insert(0, str(ROOT / "scripts"))
import synthetic

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
# Operands a question states in words rather than digits.
IMPLIED = {"half": 2, "doubles": 2, "triples": 3}
TRACE = re.compile(r"<think>\n(.+)\n</think>\nThe answer is (\d+)\.\n#### (\d+)", re.DOTALL)


def load(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def digests(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def run_builder(output: Path, *args: str) -> Path:
    subprocess.run(
        [sys.executable, str(BUILDER), "--output", str(output), *args],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return output


def true_result(a: int, op: str, b: int) -> int | None:
    if op == "/":
        return a // b if b and a % b == 0 else None
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def solve(question: str, solution: str) -> tuple[int, int]:
    """(final number, steps) of a worked solution, asserting that every step's
    `a op b = c` is true, that each operand comes from the question or an earlier
    step, and that `#### N` is the last step's result."""
    lines = solution.split("\n")
    assert lines[-1].startswith("#### "), solution
    final = int(lines[-1][len("#### ") :])
    known = {int(x) for x in re.findall(r"\d+", question)}
    known |= {value for word, value in IMPLIED.items() if word in question}
    results = []
    for line in lines[:-1]:
        (a, op, b, c), *more = EQUATION.findall(line)
        assert not more, line
        a, b, c = int(a), int(b), int(c)
        assert true_result(a, op, b) == c, line
        assert c >= 0
        assert a in known or a in results, (line, question)
        assert b in known or b in results, (line, question)
        results.append(c)
    assert results and final == results[-1], solution
    return final, len(results)


def stated_final(solution: str) -> int:
    return int(solution.rsplit("\n#### ", 1)[1])


# ---------------------------------------------------------------------------
# (a) Determinism
# ---------------------------------------------------------------------------


def test_rebuild_with_default_seed_is_byte_identical(tmp_path):
    rebuilt = digests(run_builder(tmp_path / "data"))
    shipped = digests(DATA)
    assert rebuilt.keys() == shipped.keys()
    assert [name for name in shipped if rebuilt[name] != shipped[name]] == []


def test_another_seed_gives_other_files(tmp_path):
    other = digests(run_builder(tmp_path / "data", "--seed", "1"))
    shipped = digests(DATA)
    assert other.keys() == shipped.keys()
    for name in shipped:
        if name.endswith(".jsonl"):
            assert other[name] != shipped[name], name


def test_generators_are_pure():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    first = synthetic.math_dataset(7, 30)
    assert random.random() == expected  # the global generator was not touched
    assert synthetic.math_dataset(7, 30) == first
    assert synthetic.math_dataset(8, 30) != first
    rng_a, rng_b = random.Random(5), random.Random(5)
    for make in (
        synthetic.instruction_example,
        synthetic.preference_pair,
        synthetic.hh_dialogue_pair,
        synthetic.reasoning_trace,
        synthetic.text_passage,
    ):
        assert [make(rng_a) for _ in range(20)] == [make(rng_b) for _ in range(20)]


def test_files_are_canonical_json_lines():
    total = 0
    for path in sorted(DATA.rglob("*.jsonl")):
        data = path.read_bytes()
        total += len(data)
        assert data.endswith(b"\n") and b"\r" not in data, path
        for line in data.decode("utf-8").split("\n")[:-1]:
            assert json.dumps(json.loads(line), ensure_ascii=False) == line, path
    assert total < 8 * 1024 * 1024


def test_counts_match_the_builder():
    sys.path.insert(0, str(BUILDER.parent))
    import build_datasets

    for name, count in build_datasets.COUNTS.items():
        assert len(load(name)) == count, name
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert build_datasets.REBUILD in readme
    for name in build_datasets.COUNTS:
        assert f"`{name}`" in readme


# ---------------------------------------------------------------------------
# (b) Formats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math/train.jsonl", "math/test.jsonl"])
def test_math_solutions_are_correct(name):
    for row in load(name):
        assert list(row) == ["question", "answer", "level"]
        final, steps = solve(row["question"], row["answer"])
        assert steps == row["level"]
        assert str(final) == synthetic.final_answer(row["answer"])
        assert row["question"].endswith("?")


def test_math_test_is_held_out():
    train = {r["question"] for r in load("math/train.jsonl")}
    test = [r["question"] for r in load("math/test.jsonl")]
    assert len(set(test)) == len(test)
    assert len(train) == len(load("math/train.jsonl"))
    trained_on = train | {r["messages"][0]["content"] for r in load("reasoning/train.jsonl")}
    trained_on |= {r["prompt"] for r in load("preferences/train.jsonl")}
    trained_on |= {r["prompt"][0]["content"] for r in load("rl/prompts.jsonl")}
    assert trained_on.isdisjoint(test)
    hh = "\n".join(r["chosen"] for r in load("preferences/hh_train.jsonl"))
    assert not any(q in hh for q in test)


def test_instructions():
    train, test = load("instructions/train.jsonl"), load("instructions/test.jsonl")
    for row in train + test:
        assert list(row) == ["instruction", "input", "output"]
        assert row["instruction"] and row["output"]
        asked = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["instruction"])
        if asked:
            a, op, b = asked.groups()
            assert row["output"] == f"{a} {op} {b} = {true_result(int(a), op, int(b))}."
        if row["instruction"] == "Sort these numbers from smallest to largest.":
            numbers = [int(x) for x in row["input"].split(", ")]
            assert row["output"] == ", ".join(map(str, sorted(numbers)))
        if row["instruction"] == "Reverse the order of these words.":
            assert row["output"].split() == row["input"].split()[::-1]
    seen = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in seen for r in test)
    assert sum(not r["input"] for r in train) > len(train) / 4  # "often empty"


@pytest.mark.parametrize("name", ["preferences/train.jsonl", "preferences/test.jsonl"])
def test_explicit_preferences(name):
    for row in load(name):
        assert list(row) == ["prompt", "chosen", "rejected", "kind"]
        assert row["chosen"] != row["rejected"]
        if row["kind"] == "math":
            correct, _ = solve(row["prompt"], row["chosen"])
            assert stated_final(row["rejected"]) != correct
        elif row["kind"] == "concise":
            assert row["chosen"] in row["rejected"]
            assert len(row["rejected"]) > len(row["chosen"])
            assert not any(f in row["chosen"] for f in synthetic.FILLERS)
            used = [f for f in synthetic.FILLERS if f in row["rejected"]]
            assert used and all(row["rejected"].count(f) >= 2 for f in used)
        else:
            assert row["kind"] == "polite"
            assert not any(p in row["chosen"] for p in synthetic.RUDE_PHRASES)
            assert any(p in row["rejected"] for p in synthetic.RUDE_PHRASES)


def test_explicit_preference_splits_are_disjoint():
    train = {r["prompt"] for r in load("preferences/train.jsonl")}
    assert train.isdisjoint(r["prompt"] for r in load("preferences/test.jsonl"))


def split_last_turn(dialogue: str) -> tuple[str, str]:
    cut = dialogue.rindex("\n\nAssistant:")
    return dialogue[:cut], dialogue[cut:]


@pytest.mark.parametrize("name", ["preferences/hh_train.jsonl", "preferences/hh_test.jsonl"])
def test_hh_pairs(name):
    rows = load(name)
    for row in rows:
        assert list(row) == ["chosen", "rejected"]
        assert row["chosen"] != row["rejected"]
        chosen_prefix, chosen_reply = split_last_turn(row["chosen"])
        rejected_prefix, rejected_reply = split_last_turn(row["rejected"])
        assert chosen_prefix == rejected_prefix
        assert chosen_prefix.startswith("\n\nHuman: ")
        # Turns alternate, Human first, and the final reply adds no turn of its own.
        turns = re.findall(r"\n\n(Human|Assistant): ", row["chosen"])
        assert turns == ["Human", "Assistant"] * (len(turns) // 2)
        assert "\n\nHuman:" not in chosen_reply + rejected_reply
    assert any(row["chosen"].count("\n\nHuman: ") == 2 for row in rows)  # some two-turn


def test_hh_splits_are_disjoint():
    def last_human(row):
        prefix, _ = split_last_turn(row["chosen"])
        return prefix.rsplit("\n\nHuman: ", 1)[1]

    train = {last_human(r) for r in load("preferences/hh_train.jsonl")}
    assert train.isdisjoint(last_human(r) for r in load("preferences/hh_test.jsonl"))


def trace_level(row: dict) -> int:
    """Check one reasoning conversation; return its number of solution steps."""
    assert list(row) == ["messages"]
    user, assistant = row["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    content = assistant["content"]
    assert content.count("<think>") == 1 and content.count("</think>") == 1
    assert content.startswith("<think>\n")
    think, stated, marked = TRACE.fullmatch(content).groups()
    assert stated == marked
    *steps, check = think.split("\n")
    final, level = solve(user["content"], "\n".join(steps + [f"#### {marked}"]))
    a, op, b, c = EQUATION.fullmatch(check.removeprefix("Check: ").rstrip(".")).groups()
    assert check.startswith("Check: ") and true_result(int(a), op, int(b)) == int(c)
    return level


def test_reasoning_traces():
    train, test = load("reasoning/train.jsonl"), load("reasoning/test.jsonl")
    for row in train + test:
        trace_level(row)
    sharegpt = load("reasoning/train_sharegpt.jsonl")
    assert sharegpt == [
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                            "value": m["content"]} for m in row["messages"]]}
        for row in train
    ]  # fmt: skip
    test_questions = {r["question"] for r in load("math/test.jsonl")}
    assert all(r["messages"][0]["content"] in test_questions for r in test)


def test_rl_prompts_match_math_solutions():
    solutions = {r["question"]: r for r in load("math/train.jsonl")}
    held_out = {r["question"] for r in load("math/test.jsonl")}
    rows = load("rl/prompts.jsonl")
    questions = [r["prompt"][0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    for row, question in zip(rows, questions):
        assert list(row) == ["prompt", "answer"]
        assert row["prompt"] == [{"role": "user", "content": question}]
        assert isinstance(row["answer"], str) and row["answer"].isdigit()
        assert question not in held_out
        final, _ = solve(question, solutions[question]["answer"])
        assert row["answer"] == str(final)


def test_text_passages():
    train, test = load("text/train.jsonl"), load("text/test.jsonl")
    for row in train + test:
        assert list(row) == ["text"]
        assert 0 < len(row["text"]) < 400 and "\n" not in row["text"]
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in test)


def test_sharegpt_conversion():
    example = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }
    assert synthetic.to_sharegpt(example) == {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    }


# ---------------------------------------------------------------------------
# (c) Balance
# ---------------------------------------------------------------------------


def assert_balanced(values, keys):
    counts = Counter(values)
    assert sorted(counts) == sorted(keys), counts
    assert max(counts.values()) - min(counts.values()) <= 1, counts


@pytest.mark.parametrize("name", ["math/train.jsonl", "math/test.jsonl"])
def test_math_levels_are_balanced(name):
    assert_balanced([r["level"] for r in load(name)], synthetic.LEVELS)


def test_derived_files_are_balanced():
    levels = {r["question"]: r["level"] for r in load("math/train.jsonl")}
    rl = load("rl/prompts.jsonl")
    assert_balanced([levels[r["prompt"][0]["content"]] for r in rl], synthetic.LEVELS)
    for name in ("reasoning/train.jsonl", "reasoning/test.jsonl"):
        assert_balanced([trace_level(r) for r in load(name)], synthetic.LEVELS)
    for name in ("preferences/train.jsonl", "preferences/test.jsonl"):
        assert_balanced([r["kind"] for r in load(name)], synthetic.PREFERENCE_KINDS)


def test_hh_kinds_are_balanced():
    def kind(row):
        _, reply = split_last_turn(row["rejected"])
        if any(p in reply for p in synthetic.RUDE_PHRASES):
            return "polite"
        if any(f in reply for f in synthetic.FILLERS):
            return "concise"
        assert "\n#### " in reply
        return "math"

    for name in ("preferences/hh_train.jsonl", "preferences/hh_test.jsonl"):
        assert_balanced([kind(r) for r in load(name)], synthetic.PREFERENCE_KINDS)
