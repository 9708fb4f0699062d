"""Pre-train mlxpost's bundled default model: a small GPT-2 and its BPE tokenizer.

The corpus mixes the bundled data's formats, rendered through the chat
template of mlxpost/templates.py: GSM8K-style math with worked solutions,
Alpaca-style instructions, preferred answers, <think> reasoning traces and
plain text. Math problems are drawn with their own seed and every question of
the shipped math test split is excluded, so held-out accuracy is honest. The
step count is chosen so the model is fluent in the formats but answers only a
minority of held-out problems: post-training has room to show. A later stage
may give only the final answer for a share of the math documents
(--direct-share): the model then mostly answers without working, and less
often right, as base models trained on web text do.

    python scripts/build_default_model.py                # writes mlxpost/assets/model
    python scripts/build_default_model.py --steps 200 --output /tmp/m   # a quick try

Deterministic for a given seed and torch thread count (torch CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic  # noqa: E402

from mlxpost.templates import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "mlxpost", "assets", "data")
DEFAULT_OUTPUT = os.path.join(ROOT, "mlxpost", "assets", "model")

VOCAB_SIZE = 1024
BLOCK = 256
MODEL_SHAPE = dict(n_embd=256, n_layer=4, n_head=4, n_positions=BLOCK)
# How many documents of each kind the corpus holds.
MIXTURE = {
    "math": 12000,
    "instructions": 4000,
    "preferences": 3000,
    "reasoning": 2000,
    "text": 4000,
}


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def render(messages: list[dict]) -> str:
    """The chat template, rendered without a tokenizer (the template is fixed and simple)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages)


def answer_only(solution: str) -> str:
    """A worked solution cut to its final `#### N` line: an answer given without working."""
    return solution.strip().splitlines()[-1]


def corpus(seed: int, direct_share: float = 0.0, math_docs: int = MIXTURE["math"]) -> list[str]:
    """Documents in a seeded random order; no question of the math test split appears.

    A share `direct_share` of the math documents keeps only the final answer line,
    as much web text does: a model trained on the mix mostly answers directly,
    and its rarer worked solutions are far more often right.
    """
    rng = random.Random(seed)
    direct = random.Random(seed + 202)  # its own stream: other documents do not change
    held_out = {row["question"] for row in read_jsonl(os.path.join(DATA, "math", "test.jsonl"))}
    docs = []
    math_problems = [
        p for p in synthetic.math_dataset(seed + 101, math_docs) if p["question"] not in held_out
    ]
    docs += [
        render(
            [
                {"role": "user", "content": p["question"]},
                {
                    "role": "assistant",
                    "content": answer_only(p["answer"])
                    if direct.random() < direct_share
                    else p["answer"],
                },
            ]
        )
        for p in math_problems
    ]
    for _ in range(MIXTURE["instructions"]):
        ex = synthetic.instruction_example(rng)
        prompt = ex["instruction"] + (f"\n\n{ex['input']}" if ex["input"] else "")
        docs.append(
            render(
                [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": ex["output"]},
                ]
            )
        )
    for _ in range(MIXTURE["preferences"]):
        ex = synthetic.preference_pair(rng)
        docs.append(
            render(
                [
                    {"role": "user", "content": ex["prompt"]},
                    {"role": "assistant", "content": ex["chosen"]},
                ]
            )
        )
    for _ in range(MIXTURE["reasoning"]):
        docs.append(render(synthetic.reasoning_trace(rng)["messages"]))
    for _ in range(MIXTURE["text"]):
        docs.append(synthetic.text_passage(rng)["text"] + END + "\n")
    rng.shuffle(docs)
    return docs


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # One token per digit: arithmetic is far easier to learn digit by digit.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=END)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = BLOCK
    return fast


def pack(docs: list[str], tokenizer) -> np.ndarray:
    """All documents end to end, cut into (N, BLOCK) rows."""
    stream = np.concatenate(
        [
            np.asarray(ids, np.int64)
            for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]
        ]
    )
    rows = len(stream) // BLOCK
    return stream[: rows * BLOCK].reshape(rows, BLOCK)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_accuracy(model_dir: str, limit: int) -> dict:
    """Greedy accuracy on the shipped math test split, through mlxpost's torch backend."""
    from mlxpost.answers import reference_answer
    from mlxpost.backend import get_backend
    from mlxpost.evaluation import MathEvalConfig, MathExample, evaluate_math
    from mlxpost.tokenizer import load_tokenizer

    rows = read_jsonl(os.path.join(DATA, "math", "test.jsonl"))[:limit]
    examples = [
        MathExample(
            [{"role": "user", "content": r["question"]}],
            reference_answer(r["answer"]),
            r.get("level"),
        )
        for r in rows
    ]
    backend = get_backend("torch")
    model = backend.load_model(model_dir)
    return evaluate_math(backend, model, load_tokenizer(model_dir), examples, MathEvalConfig())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from",
        default=None,
        help="continue from an earlier build's weights (same seed, same corpus)",
    )
    parser.add_argument(
        "--skip-steps", type=int, default=0, help="data-order steps the earlier build already took"
    )
    parser.add_argument(
        "--direct-share",
        type=float,
        default=0.0,
        help="share of math documents that give only the final answer line, no working",
    )
    parser.add_argument(
        "--math-docs", type=int, default=MIXTURE["math"], help="math documents in the corpus"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="held-out accuracy every N steps (0: only at the end)",
    )
    parser.add_argument(
        "--eval-limit", type=int, default=300, help="held-out problems to score (0: skip)"
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    docs = corpus(args.seed, args.direct_share, args.math_docs)
    # A later stage keeps the earlier stage's tokenizer; its --seed draws new documents.
    tokenizer = (
        PreTrainedTokenizerFast.from_pretrained(args.init_from)
        if args.init_from
        else train_tokenizer(docs)
    )
    blocks = pack(docs, tokenizer)
    print(
        f"corpus: {len(docs)} documents, {blocks.size} tokens in {len(blocks)} blocks of {BLOCK}",
        file=sys.stderr,
    )

    config = GPT2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **MODEL_SHAPE,
    )
    model = (
        GPT2LMHeadModel.from_pretrained(args.init_from)
        if args.init_from
        else GPT2LMHeadModel(config)
    )
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters",
        file=sys.stderr,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    order = np.random.default_rng(args.seed).permutation(len(blocks))
    start = time.time()
    history = []
    for step in range(args.steps):
        position = (step + args.skip_steps) * args.batch_size
        index = order[(np.arange(args.batch_size) + position) % len(order)]
        batch = torch.as_tensor(blocks[index])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, warmup=100)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f}s",
                file=sys.stderr,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            model.save_pretrained(args.output)
            tokenizer.save_pretrained(args.output)
            report = held_out_accuracy(args.output, args.eval_limit)
            history.append({"step": step, "accuracy": report["accuracy"]})
            print(
                f"step {step}: held-out accuracy {report['accuracy']:.3f} {report.get('accuracy_by_level')}",
                file=sys.stderr,
            )

    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    summary = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block": BLOCK,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "init_from": args.init_from and os.path.basename(os.path.normpath(args.init_from)),
        "skip_steps": args.skip_steps,
        "direct_share": args.direct_share,
        "math_docs": args.math_docs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(float(loss.item()), 4),
        "history": history,
    }
    if args.eval_limit:
        report = held_out_accuracy(args.output, args.eval_limit)
        summary["held_out_examples"] = report["n"]
        summary["held_out_accuracy"] = report["accuracy"]
        summary["accuracy_by_level"] = report.get("accuracy_by_level")
    summary["commands"] = build_commands(args)
    write_card(args.output, summary)
    print(f"trained in {time.time() - start:.0f}s", file=sys.stderr)
    print(json.dumps(summary, indent=2))


def build_commands(args) -> list[str]:
    """The commands that rebuild this model: an earlier stage's, then this one's."""
    earlier = []
    if args.init_from:
        with open(os.path.join(args.init_from, "build.json"), encoding="utf-8") as f:
            earlier = json.load(f)["commands"]
    options = f"--steps {args.steps} --batch-size {args.batch_size} --learning-rate {args.learning_rate} --seed {args.seed}"
    if args.direct_share:
        options += f" --direct-share {args.direct_share}"
    if args.math_docs != MIXTURE["math"]:
        options += f" --math-docs {args.math_docs}"
    if args.init_from:
        options += f" --init-from STAGE{len(earlier)} --skip-steps {args.skip_steps}"
    # STAGEk are scratch directories; the last stage's output is what ships in mlxpost/assets/model.
    return earlier + [
        f"python scripts/build_default_model.py {options} --output STAGE{len(earlier) + 1}"
    ]


def write_card(output: str, summary: dict) -> None:
    """README.md beside the weights: what the model is, how it was built, what it scores."""
    lines = [
        "# mlxpost's bundled default model",
        "",
        f"A GPT-2 ({MODEL_SHAPE['n_layer']} layers, width {MODEL_SHAPE['n_embd']}, "
        f"{summary['parameters'] / 1e6:.2f}M parameters, context {BLOCK}) with a {VOCAB_SIZE}-token",
        "byte-level BPE tokenizer (one token per digit) and the chat template of mlxpost/templates.py,",
        "pre-trained from scratch on a synthetic corpus in the formats of the bundled data.",
        "",
        *(
            [
                f"In the last stage's corpus {summary['direct_share']:.0%} of the math documents give only the",
                "final `#### N` line, with no working, as much web text does. The model therefore",
                "answers most problems directly, and rarely right; when it writes out the steps it",
                "is right far more often. That gap is what SFT on worked solutions and RL on",
                "correctness can find.",
                "",
            ]
            if summary.get("direct_share")
            else []
        ),
        "Rebuild (deterministic for a given seed and torch thread count); each stage continues",
        "the one before it:",
        "",
        *[f"    {command}" for command in summary["commands"]],
        "",
        "Build summary:",
        "",
        "```json",
        json.dumps(summary, indent=2),
        "```",
        "",
    ]
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(output, "build.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
