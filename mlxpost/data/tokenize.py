"""Normalised examples to token ids, loss masks and padded batches.

The prompt is rendered with the chat template and a generation prompt, the
whole conversation without one, and the completion is what the second adds to
the first. Templates that render a message differently once another follows
it (e.g. dropping earlier reasoning) break that split, so it is checked.

BOS: a chat template is followed (Llama 3's and Gemma's emit BOS themselves;
a rendering that starts with it gets exactly one BOS id). Without a template
(plain prompts, `template: random`, raw text), BOS is prepended where the
tokenizer's own encoding prepends it (Llama, Mistral, Gemma), never for
tokenizers without one (Qwen, GPT-2). EOS ends plain completions and texts.

Length limit (TokenizeConfig.on_too_long): a plain text longer than max_length is
cut into consecutive blocks by default ("split"), each its own example; a
conversation over the limit is dropped (or its completion cut, "truncate"),
since a piece of a conversation without its prompt teaches nothing.

Packing (`pack_lengths`, `pad_packed`): short examples share a row; the row's
attention mask then holds segment ids (0 padding, k the row's k-th example)
instead of 0/1, and both backends keep attention inside a segment and restart
positions at each segment's first token.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import numpy as np

from mlxpost.errors import UserError

TEMPLATE_MODES = ("fixed", "random")
ON_TOO_LONG = ("split", "drop", "truncate")
# Plain-text prompt formats of the "random" mode: varying the format per example
# keeps instruction tuning from tying the model to one template.
PLAIN_FORMATS = (
    "### Instruction:\n{prompt}\n\n### Response:\n",
    "Q: {prompt}\nA: ",
    "User: {prompt}\nAssistant: ",
    "{prompt}\n\n",
    "Question: {prompt}\nAnswer: ",
)


@dataclass
class TokenizeConfig:
    max_length: int | None = field(
        default=None, metadata={"help": "Most tokens per sequence; None: no limit."}
    )
    on_too_long: str = field(
        default="split",
        metadata={
            "help": "split: cut a plain text into consecutive max_length blocks, each an "
            "example, and drop longer conversations; drop: skip every longer example; "
            "truncate: cut the completion's (or text's) end (examples whose prompt alone is "
            "too long are still dropped)."
        },
    )
    template: str = field(
        default="fixed",
        metadata={
            "help": "fixed: the tokenizer's chat template; random: a plain-text prompt format "
            "drawn per example from PLAIN_FORMATS."
        },
    )
    completion_only: bool = field(
        default=True,
        metadata={"help": "Loss on completion tokens only; False: on every token but the first."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random template choice."})

    def __post_init__(self):
        if self.template not in TEMPLATE_MODES:
            raise UserError(f"unknown template mode {self.template!r}; choose fixed or random")
        if self.on_too_long not in ON_TOO_LONG:
            raise UserError(
                f"unknown on_too_long {self.on_too_long!r}; choose {', '.join(ON_TOO_LONG)}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"max_length must be at least 2, got {self.max_length}")


@dataclass
class TokenizedExample:
    input_ids: list[int] = field(metadata={"help": "Prompt then completion token ids."})
    loss_mask: list[int] = field(metadata={"help": "1 where the token counts in the loss."})
    prompt_length: int = field(metadata={"help": "How many leading ids are the prompt."})
    index: int = field(default=0, metadata={"help": "Position of the source example."})
    truncated: bool = field(default=False, metadata={"help": "The completion was cut."})
    text: bool = field(default=False, metadata={"help": "A plain text (no prompt)."})
    block: int | None = field(
        default=None, metadata={"help": "Which block of a split text this is (0 first)."}
    )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's plain encoding (add_special_tokens=True) starts with its BOS,
    as Llama's, Mistral's and Gemma's do."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


class ChatEncoder:
    """Encodes examples with one tokenizer and template mode (see TokenizeConfig)."""

    def __init__(self, tokenizer, config: TokenizeConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or TokenizeConfig()
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.bos_text = getattr(tokenizer, "bos_token", None) if self.bos_id is not None else None
        self.plain_bos = adds_bos(tokenizer)
        self.use_template = self.config.template == "fixed" and has_chat_template(tokenizer)
        if self.config.template == "fixed" and not self.use_template:
            warnings.warn(
                "the tokenizer has no chat template: prompts are rendered as plain "
                "'prompt\\n' + completion, with EOS appended",
                UserWarning,
                stacklevel=2,
            )

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def rendered_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Ids of the template's rendering, BOS as the template writes it: one BOS id if the
        rendering starts with the BOS text (however often), none otherwise."""
        text = self.render(messages, add_generation_prompt)
        if not self.bos_text or not text.startswith(self.bos_text):
            return self.ids(text)
        while text.startswith(self.bos_text):
            text = text[len(self.bos_text) :]
        return [self.bos_id] + self.ids(text)

    def with_bos(self, ids: list[int]) -> list[int]:
        """BOS first where the tokenizer's own encoding puts it (plain text, no template)."""
        if self.plain_bos and (not ids or ids[0] != self.bos_id):
            return [self.bos_id] + ids
        return ids

    def plain_prompt(self, messages: list[dict], index: int) -> str:
        body = "\n\n".join(message["content"] for message in messages)
        if self.config.template == "random":
            # Seeded per example, so the choice does not depend on filtering or order.
            rng = random.Random(f"{self.config.seed}:{index}")
            return rng.choice(PLAIN_FORMATS).replace("{prompt}", body)
        return body + "\n"

    def with_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            return ids + [self.eos_id]
        return ids

    def prompt_ids(self, prompt_messages: list[dict], index: int = 0) -> list[int]:
        if self.use_template:
            return self.rendered_ids(prompt_messages, add_generation_prompt=True)
        return self.with_bos(self.ids(self.plain_prompt(prompt_messages, index)))

    def split(self, prompt_messages, completion_messages, index: int = 0):
        """(prompt ids, completion ids) of one prompt and completion."""
        if not self.use_template:
            completion = "\n".join(message["content"] for message in completion_messages)
            return self.prompt_ids(prompt_messages, index), self.with_eos(self.ids(completion))
        prompt = self.prompt_ids(prompt_messages, index)
        full = self.rendered_ids(prompt_messages + completion_messages, False)
        if full[: len(prompt)] != prompt:
            raise UserError(
                f"example {index}: the chat template renders the prompt differently when a "
                "completion follows it, so the completion tokens cannot be located; "
                "use template mode 'random' or a template whose prompt is a prefix of the "
                "whole conversation"
            )
        return prompt, full[len(prompt) :]

    def encode(self, example, index: int = 0) -> TokenizedExample:
        """A ChatExample or UnpairedExample as ids and a loss mask."""
        if getattr(example, "text", None) is not None:
            ids = self.with_eos(self.with_bos(self.ids(example.text)))
            return TokenizedExample(ids, [0] + [1] * (len(ids) - 1), 0, index, text=True)
        prompt, completion = self.split(example.prompt_messages, example.completion_messages, index)
        return self.join(prompt, completion, index)

    def join(self, prompt: list[int], completion: list[int], index: int) -> TokenizedExample:
        ids = prompt + completion
        if self.config.completion_only:
            mask = [0] * len(prompt) + [1] * len(completion)
        else:
            mask = [0] + [1] * (len(ids) - 1)
        return TokenizedExample(ids, mask, len(prompt), index)

    def encode_pair(self, example, index: int = 0):
        """(chosen, rejected) TokenizedExamples of a PreferenceExample."""
        prompt, chosen = self.split(example.prompt_messages, example.chosen_messages, index)
        _, rejected = self.split(example.prompt_messages, example.rejected_messages, index)
        return self.join(prompt, chosen, index), self.join(prompt, rejected, index)

    def encode_prompt(self, example, index: int = 0) -> TokenizedExample:
        """A PromptExample's prompt ids (nothing to learn from: the mask is all 0)."""
        ids = self.prompt_ids(example.prompt_messages, index)
        return TokenizedExample(ids, [0] * len(ids), len(ids), index)


def fit_length(example: TokenizedExample, max_length: int | None, on_too_long: str):
    """(example or None, what happened: None, 'truncated', 'dropped_too_long' or
    'dropped_prompt_too_long'). 'split' is limit_lengths' (a text becomes several examples,
    see split_text); for anything else it drops, as 'drop' does."""
    if max_length is None or len(example.input_ids) <= max_length:
        return example, None
    if on_too_long != "truncate":
        return None, "dropped_too_long"
    if example.prompt_length >= max_length:
        return None, "dropped_prompt_too_long"  # nothing of the completion would be left
    cut = TokenizedExample(
        example.input_ids[:max_length],
        example.loss_mask[:max_length],
        example.prompt_length,
        example.index,
        truncated=True,
        text=example.text,
    )
    return cut, "truncated"


def split_text(example: TokenizedExample, max_length: int) -> list[TokenizedExample]:
    """A text's ids (BOS and EOS included, as encoded) cut into consecutive blocks of at most
    max_length tokens, each an example whose loss covers every token but its first (nothing
    in the block predicts that one). A last block of a single token, which would have
    nothing to learn from, is left out."""
    blocks = []
    for number, start in enumerate(range(0, len(example.input_ids), max_length)):
        ids = example.input_ids[start : start + max_length]
        if len(ids) < 2:
            break
        blocks.append(
            TokenizedExample(
                ids, [0] + [1] * (len(ids) - 1), 0, example.index, text=True, block=number
            )
        )
    return blocks


def limit_lengths(items, config: TokenizeConfig):
    """(kept, length report) of TokenizedExamples or (chosen, rejected) pairs under
    config.max_length; a pair is truncated or dropped as a whole. Under on_too_long 'split' a
    text over the limit becomes several examples (report: `split` texts became `blocks`
    examples; `kept` counts source examples, so len(kept list) = kept - split + blocks)."""
    report = {
        "total": len(items),
        "kept": 0,
        "truncated": 0,
        "split": 0,
        "blocks": 0,
        "dropped_too_long": 0,
        "dropped_prompt_too_long": 0,
        "max_length": config.max_length,
        "on_too_long": config.on_too_long,
    }
    kept = []
    for item in items:
        if (
            config.on_too_long == "split"
            and isinstance(item, TokenizedExample)
            and item.text
            and config.max_length is not None
            and len(item.input_ids) > config.max_length
        ):
            blocks = split_text(item, config.max_length)
            report["split"] += 1
            report["blocks"] += len(blocks)
            report["kept"] += 1
            kept.extend(blocks)
            continue
        sides = item if isinstance(item, tuple) else (item,)
        fitted = [fit_length(side, config.max_length, config.on_too_long) for side in sides]
        events = {event for _, event in fitted if event}
        dropped = sorted(e for e in events if e.startswith("dropped"))
        if dropped:
            report[dropped[0]] += 1
            continue
        if events:
            report["truncated"] += 1
        sides = tuple(side for side, _ in fitted)
        kept.append(sides if isinstance(item, tuple) else sides[0])
        report["kept"] += 1
    return kept, report


def tokenize_examples(examples, tokenizer, config: TokenizeConfig | None = None):
    """(TokenizedExamples, length report) of ChatExamples, UnpairedExamples or PromptExamples."""
    config = config or TokenizeConfig()
    encoder = ChatEncoder(tokenizer, config)
    encoded = []
    for index, example in enumerate(examples):
        if hasattr(example, "extras"):
            encoded.append(encoder.encode_prompt(example, index))
        else:
            encoded.append(encoder.encode(example, index))
    return limit_lengths(encoded, config)


def tokenize_preferences(examples, tokenizer, config: TokenizeConfig | None = None):
    """([(chosen, rejected)], length report) of PreferenceExamples."""
    config = config or TokenizeConfig()
    encoder = ChatEncoder(tokenizer, config)
    pairs = [encoder.encode_pair(example, index) for index, example in enumerate(examples)]
    return limit_lengths(pairs, config)


def pad_batch(sequences, pad_id: int, side: str = "right", length: int | None = None):
    """(ids, attention_mask): int32 (B, T) arrays, T the longest row (or `length`)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in sequences), default=0) if length is None else length
    ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    attention = np.zeros((len(sequences), width), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence) > width:
            raise ValueError(f"row {row} has {len(sequence)} tokens, more than length {width}")
        if not len(sequence):
            continue
        columns = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), None)
        ids[row, columns] = sequence
        attention[row, columns] = 1
    return ids, attention


def pad_masks(masks, side: str = "right", length: int | None = None) -> np.ndarray:
    """0/1 masks (e.g. loss masks) padded with 0 like pad_batch pads their ids."""
    return pad_batch(masks, 0, side, length)[0]


def pack_lengths(lengths, capacity: int) -> list[list[int]]:
    """Indices of sequences of the given lengths packed into rows of at most `capacity`
    tokens: first-fit decreasing (longest first, ties by index; each into the first row with
    room, a new row when none has), so the packing is a pure function of the lengths. Each
    row lists its indices in increasing order. O(n log n): a max-tree over the rows' room."""
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row's {capacity}"
        )
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [capacity] * (2 * size)  # room[node]: the most room of any row under node
    rows: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        node = 1
        while node < size:  # the leftmost row with room: rows not opened yet are empty
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return [sorted(row) for row in rows]


def pad_packed(rows, pad_id: int, length: int | None = None):
    """(ids, segments): int32 (B, T) arrays of rows that each hold several sequences one after
    another, right-padded; segments is the attention mask with segment ids: 0 on padding,
    k on the row's k-th sequence (1, 2, ...)."""
    joined = [[token for sequence in row for token in sequence] for row in rows]
    ids, attention = pad_batch(joined, pad_id, "right", length)
    segments = np.zeros_like(attention)
    for r, row in enumerate(rows):
        start = 0
        for k, sequence in enumerate(row, 1):
            segments[r, start : start + len(sequence)] = k
            start += len(sequence)
    return ids, segments
