"""Build mlxpost's bundled synthetic datasets (mlxpost/assets/data/).

Deterministic: the same `--seed` writes byte-identical files on any machine.
Every split is drawn from its own seeded stream of `synthetic.py`, and every
held-out split is disjoint from the training data it would be evaluated
against, so a gain on a test file is not memorisation.

    python scripts/build_datasets.py [--seed 0] [--output mlxpost/assets/data]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic as syn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "mlxpost" / "assets" / "data"
REBUILD = "python scripts/build_datasets.py"

COUNTS = {
    "math/train.jsonl": 6000,
    "math/test.jsonl": 300,
    "instructions/train.jsonl": 3000,
    "instructions/test.jsonl": 200,
    "preferences/train.jsonl": 3000,
    "preferences/test.jsonl": 300,
    "preferences/hh_train.jsonl": 2000,
    "preferences/hh_test.jsonl": 200,
    "reasoning/train.jsonl": 2000,
    "reasoning/train_sharegpt.jsonl": 2000,
    "reasoning/test.jsonl": 200,
    "rl/prompts.jsonl": 2000,
    "text/train.jsonl": 3000,
    "text/test.jsonl": 200,
}

DESCRIPTIONS = {
    "math/train.jsonl": "GSM8K: `question`, `answer` (one `a op b = c` line per step, then `#### N`), `level` (steps: 1-3, balanced)",
    "math/test.jsonl": "GSM8K, as train; no question shared with any training file",
    "instructions/train.jsonl": "Alpaca: `instruction`, `input` (often empty), `output`",
    "instructions/test.jsonl": "Alpaca; no (instruction, input) shared with train",
    "preferences/train.jsonl": "explicit: `prompt`, `chosen`, `rejected`, `kind` (math / concise / polite, balanced)",
    "preferences/test.jsonl": "explicit; no prompt shared with train",
    "preferences/hh_train.jsonl": 'Anthropic HH-RLHF: `chosen`, `rejected` dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."), differing only in the last assistant turn',
    "preferences/hh_test.jsonl": "HH-RLHF; no last human turn shared with hh_train",
    "reasoning/train.jsonl": "conversational `messages` (user, assistant `<think>\\n...\\n</think>\\nThe answer is N.\\n#### N`)",
    "reasoning/train_sharegpt.jsonl": 'the same conversations as ShareGPT: `conversations` of `{"from": "human"|"gpt", "value"}`',
    "reasoning/test.jsonl": "`messages`; the first 200 questions of math/test",
    "rl/prompts.jsonl": 'prompt-only: `prompt` (`[{"role": "user", "content": question}]`), `answer` (the final number, a string); questions of math/train',
    "text/train.jsonl": "`text`: short stories and facts (capitals, animals, colours, opposites, days, sums)",
    "text/test.jsonl": "`text`; no passage shared with train",
}


def stream(seed: int, name: str) -> random.Random:
    """An independent generator per split, so resizing one split leaves the others unchanged."""
    return random.Random(f"{seed}:{name}")


def collect(make, n: int, key, skip=None) -> list[dict]:
    """`n` rows from `make(i)` with distinct `key(row)`, leaving out rows where `skip(row)`.

    `make` gets the row's index so that it can cycle kinds and keep them balanced;
    a rejected draw is redrawn with the same index."""
    rows, seen = [], set()
    for i in range(n):
        for _ in range(10_000):
            row = make(i)
            k = key(row)
            if k not in seen and not (skip and skip(row)):
                break
        else:
            raise RuntimeError(f"could not draw a new distinct row ({i} of {n} so far)")
        seen.add(k)
        rows.append(row)
    return rows


def last_human_turn(dialogue: str) -> str:
    """The last human message of an HH dialogue."""
    prefix = dialogue[: dialogue.rindex("\n\nAssistant:")]
    return prefix[prefix.rindex("\n\nHuman: ") + len("\n\nHuman: ") :]


def by_level(problems, count: int, rng: random.Random) -> list[dict]:
    """`count` of `problems`, the levels in turn (balanced), drawn at random."""
    pools = {level: [p for p in problems if p["level"] == level] for level in syn.LEVELS}
    picks = {
        level: rng.sample(pools[level], len(range(i, count, len(syn.LEVELS))))
        for i, level in enumerate(syn.LEVELS)
    }
    return [picks[syn.LEVELS[i % 3]][i // 3] for i in range(count)]


def build(seed: int) -> dict[str, list[dict]]:
    """Every file's rows, keyed by path relative to the output directory."""
    c = COUNTS
    files: dict[str, list[dict]] = {}

    # Math first: its test questions are held out of everything trained on.
    math_train = syn.math_dataset(f"{seed}:math-train", c["math/train.jsonl"])
    train_questions = {p["question"] for p in math_train}
    math_test = syn.math_dataset(f"{seed}:math-test", c["math/test.jsonl"], exclude=train_questions)
    held_out = {p["question"] for p in math_test}
    files["math/train.jsonl"] = math_train
    files["math/test.jsonl"] = math_test

    rng = stream(seed, "instructions-train")
    # Training rows may repeat (a table has few capitals); test rows are new pairs.
    train = [syn.instruction_example(rng) for _ in range(c["instructions/train.jsonl"])]
    pairs = {(e["instruction"], e["input"]) for e in train}
    rng = stream(seed, "instructions-test")
    files["instructions/train.jsonl"] = train
    files["instructions/test.jsonl"] = collect(
        lambda i: syn.instruction_example(rng),
        c["instructions/test.jsonl"],
        key=lambda e: (e["instruction"], e["input"]),
        skip=lambda e: (e["instruction"], e["input"]) in pairs,
    )

    def kind(i):
        return syn.PREFERENCE_KINDS[i % len(syn.PREFERENCE_KINDS)]

    rng = stream(seed, "preferences-train")
    train = collect(
        lambda i: syn.preference_pair(rng, kind(i)),
        c["preferences/train.jsonl"],
        key=lambda r: (r["prompt"], r["chosen"], r["rejected"]),
        skip=lambda r: r["prompt"] in held_out,
    )
    seen_prompts = {r["prompt"] for r in train} | train_questions
    rng = stream(seed, "preferences-test")
    files["preferences/train.jsonl"] = train
    files["preferences/test.jsonl"] = collect(
        lambda i: syn.preference_pair(rng, kind(i)),
        c["preferences/test.jsonl"],
        key=lambda r: r["prompt"],
        skip=lambda r: r["prompt"] in seen_prompts,
    )

    rng = stream(seed, "hh-train")
    train = collect(
        lambda i: syn.hh_dialogue_pair(rng, kind(i)),
        c["preferences/hh_train.jsonl"],
        key=lambda r: (r["chosen"], r["rejected"]),
        skip=lambda r: last_human_turn(r["chosen"]) in held_out,
    )
    seen_turns = {last_human_turn(r["chosen"]) for r in train} | train_questions
    rng = stream(seed, "hh-test")
    files["preferences/hh_train.jsonl"] = train
    files["preferences/hh_test.jsonl"] = collect(
        lambda i: syn.hh_dialogue_pair(rng, kind(i)),
        c["preferences/hh_test.jsonl"],
        key=lambda r: last_human_turn(r["chosen"]),
        skip=lambda r: last_human_turn(r["chosen"]) in seen_turns,
    )

    problems = syn.math_dataset(
        f"{seed}:reasoning-train", c["reasoning/train.jsonl"], exclude=held_out
    )
    traces = [syn.reasoning_from_problem(p) for p in problems]
    files["reasoning/train.jsonl"] = traces
    files["reasoning/train_sharegpt.jsonl"] = [syn.to_sharegpt(t) for t in traces]
    # math_dataset cycles levels, so the first questions of math/test are balanced too.
    files["reasoning/test.jsonl"] = [
        syn.reasoning_from_problem(p) for p in math_test[: c["reasoning/test.jsonl"]]
    ]

    # RL trains on math/train questions: their answers are known, and none is held out.
    files["rl/prompts.jsonl"] = [
        {
            "prompt": [{"role": "user", "content": p["question"]}],
            "answer": syn.final_answer(p["answer"]),
        }
        for p in by_level(math_train, c["rl/prompts.jsonl"], stream(seed, "rl"))
    ]

    rng = stream(seed, "text-train")
    train = collect(lambda i: syn.text_passage(rng), c["text/train.jsonl"], key=lambda r: r["text"])
    texts = {r["text"] for r in train}
    rng = stream(seed, "text-test")
    files["text/train.jsonl"] = train
    files["text/test.jsonl"] = collect(
        lambda i: syn.text_passage(rng),
        c["text/test.jsonl"],
        key=lambda r: r["text"],
        skip=lambda r: r["text"] in texts,
    )
    return files


def encode(rows) -> bytes:
    """JSON Lines, UTF-8, "\\n" endings; keys in the order the generators wrote them."""
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)
    return text.encode("utf-8")


def readme(files: dict[str, list[dict]], sizes: dict[str, int]) -> str:
    rows = "\n".join(
        f"| `{path}` | {len(files[path])} | {sizes[path] / 1024:.0f} KiB | {DESCRIPTIONS[path]} |"
        for path in files
    )
    return f"""# Bundled synthetic data

Small, seeded datasets for trying every mlxpost command on a tiny model. Each file uses
the layout of a public dataset users bring (GSM8K, Alpaca, Anthropic HH-RLHF,
OpenThoughts / ShareGPT), so it goes through the same loading code. The texts are short,
the vocabulary small and the phrasing consistent, so that a ~4M-parameter model learns
them and shows gains from SFT, DPO, GRPO and PPO.

| file | rows | size | format |
| --- | ---: | ---: | --- |
{rows}

Math problems have 1 to 3 steps with `+`, `-`, `*` (factors up to 12) and exact `/`;
questions use numbers up to about 60, and every result is a non-negative integer of
at most three digits. Preference pairs are verifiably ordered: a correct solution against
one with a wrong step or final number (`math`), a plain answer against one padded with
repeated filler sentences (`concise`), a friendly answer against one with an insult
(`polite`).

Rebuild (deterministic; `tests/test_datasets.py` checks that these files are exactly what
the default seed gives):

    {REBUILD} [--seed 0] [--output mlxpost/assets/data]

Generators: `scripts/synthetic.py`.
"""


def write(output: Path, files: dict[str, list[dict]]) -> None:
    """Write every file (and the README), printing row counts and sizes."""
    sizes = {}
    for path, rows in files.items():
        target = output / path
        target.parent.mkdir(parents=True, exist_ok=True)
        data = encode(rows)
        target.write_bytes(data)
        sizes[path] = len(data)
        print(f"{path:34s} {len(rows):6d} rows {len(data) / 1024:8.0f} KiB")
    (output / "README.md").write_bytes(readme(files, sizes).encode("utf-8"))
    print(
        f"{'total':34s} {sum(map(len, files.values())):6d} rows {sum(sizes.values()) / 1024:8.0f} KiB"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    write(args.output, build(args.seed))


if __name__ == "__main__":
    main()
