"""Splitting preference pairs into a shared prompt and two completions.

Anthropic's HH-RLHF stores each side as one string, the whole dialogue:
"\\n\\nHuman: ...\\n\\nAssistant: ...". The two sides agree up to the last
assistant turn, so the prompt is their shared prefix cut at its last
"\\n\\nAssistant:", and the turns before it become messages.
"""

from __future__ import annotations

import os
import re

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh(chosen: str, rejected: str):
    """(prompt messages, chosen messages, rejected messages) of an HH-RLHF pair."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(
            'chosen and rejected share no prefix ending in "\\n\\nAssistant:"; '
            "give the prompt in a separate 'prompt' column"
        )
    cut += len(ASSISTANT)
    prompt = hh_messages(chosen[:cut])
    if not prompt:
        raise ValueError("the shared prompt has no Human turn")
    return (
        prompt,
        [{"role": "assistant", "content": chosen[cut:].strip()}],
        [{"role": "assistant", "content": rejected[cut:].strip()}],
    )


def hh_messages(dialogue: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nAssistant:' -> user a, assistant b.

    The trailing empty "Assistant:" is the generation prompt, not a turn; text
    before the first marker (rare) is kept as a system message.
    """
    parts = TURN.split(dialogue)
    messages = []
    if parts[0].strip():
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": HH_ROLES[speaker], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def split_conversations(chosen: list[dict], rejected: list[dict]):
    """(prompt, chosen, rejected) of two conversations that share a prefix of messages."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(
            "chosen and rejected share no prompt messages; give the prompt in a 'prompt' column"
        )
    if shared == len(chosen) or shared == len(rejected):
        raise ValueError("chosen and rejected do not differ after their shared prompt")
    for side in (chosen, rejected):
        if side[shared]["role"] != "assistant":
            raise ValueError(
                f"chosen and rejected first differ at message {shared}, "
                f"from {side[shared]['role']!r} rather than the assistant"
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def strip_prefix(prompt: list[dict], messages: list[dict]) -> list[dict]:
    """`messages` without a leading copy of `prompt` (some datasets repeat it)."""
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        return messages[len(prompt) :]
    return messages


def unpair(pairs) -> list:
    """Paired preferences as KTO examples: chosen labelled True, rejected False."""
    from mlxpost.data.formats import UnpairedExample

    examples = []
    for pair in pairs:
        examples.append(UnpairedExample(pair.prompt_messages, pair.chosen_messages, True))
        examples.append(UnpairedExample(pair.prompt_messages, pair.rejected_messages, False))
    return examples
