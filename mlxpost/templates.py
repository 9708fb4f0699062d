"""The chat format of mlxpost's bundled models.

Each message is `<|role|>\\n content <|end|>\\n`; a generation prompt ends with
`<|assistant|>\\n`, and the assistant's turn ends with `<|end|>`, the EOS
token. User checkpoints bring their own template in tokenizer_config.json.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
END = "<|end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, END] + [f"<|{role}|>" for role in ROLES]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
