"""Which dataset formats each command reads, and their normalisation to small dataclasses.

Column names follow TRL's dataset formats, so a TRL dataset works unchanged.
A string prompt becomes one user message and a string completion one
assistant message; the chat template is applied later (see tokenize.py). A
conversation trains on its last message, which must be the assistant's; the
turns before it are the prompt.
Rows are numbered from 0, as `dataset[i]` indexes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxpost.data import preference
from mlxpost.data.loading import json_kind
from mlxpost.errors import UserError

COMMANDS = ("sft", "distill", "rm", "dpo", "kto", "grpo", "ppo", "eval-math")

# Per command, the formats it accepts as (name, required columns), first match wins.
CHAT_FORMATS = (
    ("conversational", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt-completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("gsm8k", ("question", "answer")),
    ("text", ("text",)),
)
PREFERENCE_FORMATS = (
    ("explicit-preference", ("prompt", "chosen", "rejected")),
    ("implicit-preference", ("chosen", "rejected")),
)
FORMATS = {
    "sft": CHAT_FORMATS,
    "distill": CHAT_FORMATS,
    "rm": PREFERENCE_FORMATS,
    "dpo": PREFERENCE_FORMATS,
    # KTO learns from unpaired labels; paired data is unpaired (chosen: True, rejected: False).
    "kto": (("unpaired-preference", ("prompt", "completion", "label")),) + PREFERENCE_FORMATS,
    "grpo": (("prompt", ("prompt",)), ("gsm8k", ("question",))),
    "ppo": (("prompt", ("prompt",)), ("gsm8k", ("question",))),
    "eval-math": (("gsm8k", ("question", "answer")), ("prompt-answer", ("prompt", "answer"))),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class ChatExample:
    """A supervised example: loss on the completion, or on all of `text`."""

    prompt_messages: list[dict] = field(metadata={"help": "Messages before the completion."})
    completion_messages: list[dict] | None = field(
        default=None, metadata={"help": "The assistant turn(s) trained on; None for plain text."}
    )
    text: str | None = field(
        default=None, metadata={"help": "Plain text for language modelling (no template)."}
    )


@dataclass
class PreferenceExample:
    """A chosen and a rejected completion of the same prompt (reward models, DPO)."""

    prompt_messages: list[dict] = field(metadata={"help": "The shared conversation prefix."})
    chosen_messages: list[dict] = field(metadata={"help": "The preferred completion."})
    rejected_messages: list[dict] = field(metadata={"help": "The dispreferred completion."})
    margin: float | None = field(
        default=None, metadata={"help": "How much better chosen is (reward-model margin loss)."}
    )


@dataclass
class UnpairedExample:
    """One completion labelled desirable or not (KTO)."""

    prompt_messages: list[dict] = field(metadata={"help": "Messages before the completion."})
    completion_messages: list[dict] = field(metadata={"help": "The labelled completion."})
    label: bool = field(default=True, metadata={"help": "True if the completion is desirable."})


@dataclass
class PromptExample:
    """A prompt to generate from (GRPO, PPO, math evaluation) and its other columns."""

    prompt_messages: list[dict] = field(metadata={"help": "The conversation to continue."})
    extras: dict = field(
        default_factory=dict,
        metadata={"help": "Every other column, for reward functions (e.g. answer, answer_number)."},
    )


def columns_of(records: list[dict]) -> list[str]:
    """Every column any row has, in order of first appearance."""
    seen = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def describe_format(columns: tuple[str, ...]) -> str:
    return "+".join(columns)


def detect_format(columns, command: str, path: str = "data") -> str:
    """The first format of `command` whose columns are all present; UserError if none is."""
    if command not in FORMATS:
        raise UserError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    present = set(columns)
    for name, needed in FORMATS[command]:
        if present.issuperset(needed):
            return name
    options = " | ".join(describe_format(needed) for _, needed in FORMATS[command])
    raise UserError(
        f"{path}: missing column(s) for {command}: needs one of [{options}]; "
        f"found [{', '.join(columns)}]"
    )


def normalise_records(records: list[dict], command: str, path: str = "data"):
    """(format name, examples) for `command`; UserError names the row and column of bad values."""
    name = detect_format(columns_of(records), command, path)
    reader = Reader(path)
    if command == "kto" and name != "unpaired-preference":
        pairs = [reader.preference(name, row, record) for row, record in enumerate(records)]
        return name, preference.unpair(pairs)
    read = {
        "sft": reader.chat,
        "distill": reader.chat,
        "rm": reader.preference,
        "dpo": reader.preference,
        "kto": reader.unpaired,
        "grpo": reader.prompt,
        "ppo": reader.prompt,
        "eval-math": reader.math,
    }[command]
    return name, [read(name, row, record) for row, record in enumerate(records)]


class Reader:
    """Converts one row of a known format; errors name the file, row and column."""

    def __init__(self, path: str):
        self.path = path

    def error(self, row: int, column: str, problem: str) -> UserError:
        return UserError(f"{self.path}: row {row}, column {column!r}: {problem}")

    def string(self, row: int, record: dict, column: str, optional: bool = False) -> str:
        value = record.get(column)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise self.error(row, column, f"expected a string, got {json_kind(value)}")
        return value

    def messages(
        self, row: int, record: dict, column: str, role: str | None = "user"
    ) -> list[dict]:
        """A string (one message with `role`) or a list of {role, content} messages; with
        role None, only the list."""
        value = record.get(column)
        if isinstance(value, str) and role is not None:
            return [{"role": role, "content": value}]
        if not isinstance(value, list):
            expected = "a list of {role, content} messages"
            if role is not None:
                expected = "a string or " + expected
            raise self.error(row, column, f"expected {expected}, got {json_kind(value)}")
        messages = []
        for i, message in enumerate(value):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise self.error(
                    row, column, f"message {i} is not a {{role: string, content: string}} object"
                )
            messages.append({"role": message["role"], "content": message["content"]})
        if not messages:
            raise self.error(row, column, "no messages")
        return messages

    def sharegpt(self, row: int, record: dict, column: str) -> list[dict]:
        value = record.get(column)
        if not isinstance(value, list) or not value:
            raise self.error(
                row, column, f"expected a list of {{from, value}} turns, got {json_kind(value)}"
            )
        messages = []
        for i, turn in enumerate(value):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise self.error(row, column, f"turn {i} is not a {{from, value: string}} object")
            role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
            if role is None:
                raise self.error(
                    row,
                    column,
                    f"turn {i} is from {turn.get('from')!r}; expected one of {', '.join(SHAREGPT_ROLES)}",
                )
            messages.append({"role": role, "content": turn["value"]})
        return messages

    def split_last_turn(self, row: int, column: str, messages: list[dict]):
        """(prompt, completion): the completion is the last assistant message."""
        if messages[-1]["role"] != "assistant":
            raise self.error(
                row, column, f"the last message is from {messages[-1]['role']!r}, not the assistant"
            )
        return messages[:-1], messages[-1:]

    def chat(self, name: str, row: int, record: dict) -> ChatExample:
        if name in ("conversational", "sharegpt"):
            column = "messages" if name == "conversational" else "conversations"
            if name == "conversational":
                messages = self.messages(row, record, column, role=None)
            else:
                messages = self.sharegpt(row, record, column)
            prompt, completion = self.split_last_turn(row, column, messages)
            return ChatExample(prompt, completion)
        if name == "prompt-completion":
            prompt = self.messages(row, record, "prompt")
            return ChatExample(prompt, self.messages(row, record, "completion", role="assistant"))
        if name == "alpaca":
            instruction = self.string(row, record, "instruction")
            extra = self.string(row, record, "input", optional=True)
            content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            output = self.string(row, record, "output")
            return ChatExample(
                [{"role": "user", "content": content}], [{"role": "assistant", "content": output}]
            )
        if name == "gsm8k":
            question = self.string(row, record, "question")
            answer = self.string(row, record, "answer")
            return ChatExample(
                [{"role": "user", "content": question}], [{"role": "assistant", "content": answer}]
            )
        return ChatExample([], None, text=self.string(row, record, "text"))

    def preference(self, name: str, row: int, record: dict) -> PreferenceExample:
        margin = record.get("margin")
        if margin is not None and (
            isinstance(margin, bool) or not isinstance(margin, (int, float))
        ):
            raise self.error(row, "margin", f"expected a number, got {json_kind(margin)}")
        margin = None if margin is None else float(margin)
        if name == "explicit-preference":
            prompt = self.messages(row, record, "prompt")
            chosen = self.messages(row, record, "chosen", role="assistant")
            rejected = self.messages(row, record, "rejected", role="assistant")
            # Some datasets repeat the prompt at the start of chosen/rejected.
            chosen = preference.strip_prefix(prompt, chosen)
            rejected = preference.strip_prefix(prompt, rejected)
            return PreferenceExample(prompt, chosen, rejected, margin)
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if isinstance(chosen, str) and isinstance(rejected, str):
            try:
                prompt, chosen, rejected = preference.split_hh(chosen, rejected)
            except ValueError as err:
                raise self.error(row, "chosen", str(err)) from None
            return PreferenceExample(prompt, chosen, rejected, margin)
        chosen = self.messages(row, record, "chosen")
        rejected = self.messages(row, record, "rejected")
        try:
            prompt, chosen, rejected = preference.split_conversations(chosen, rejected)
        except ValueError as err:
            raise self.error(row, "chosen", str(err)) from None
        return PreferenceExample(prompt, chosen, rejected, margin)

    def unpaired(self, name: str, row: int, record: dict) -> UnpairedExample:
        label = record.get("label")
        if label in (0, 1) and not isinstance(label, bool):
            label = bool(label)  # a CSV or Parquet column of 0/1
        if not isinstance(label, bool):
            raise self.error(row, "label", f"expected true or false, got {json_kind(label)}")
        prompt = self.messages(row, record, "prompt")
        completion = self.messages(row, record, "completion", role="assistant")
        return UnpairedExample(prompt, completion, label)

    def prompt(self, name: str, row: int, record: dict) -> PromptExample:
        column = "question" if name == "gsm8k" else "prompt"
        prompt = self.messages(row, record, column)
        extras = {key: value for key, value in record.items() if key != column}
        answer = extras.get("answer")
        if isinstance(answer, (str, int, float)) and not isinstance(answer, bool):
            extras["answer_number"] = answer_number(str(answer))
        return PromptExample(prompt, extras)

    def math(self, name: str, row: int, record: dict) -> PromptExample:
        answer = record.get("answer")
        if not isinstance(answer, (int, float)) or isinstance(answer, bool):
            self.string(row, record, "answer")  # numbers are fine: CSV reads "42" as one
        example = self.prompt(name, row, record)
        if example.extras["answer_number"] is None:
            raise self.error(row, "answer", "no number in the answer to grade against")
        return example


def answer_number(answer: str) -> str | None:
    """The gold number of a GSM8K answer (after `####`), as evaluation extracts it."""
    from mlxpost.answers import reference_answer

    return reference_answer(answer)
