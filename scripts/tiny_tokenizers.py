"""Tiny tokenizers in the conventions of each architecture's family, for the tiny checkpoints
of scripts/build_tiny_models.py.

Each is a small byte-level BPE trained like build_tiny_models.build_tokenizer, with the
family's special tokens (ids 0, 1, ... in the order listed, so they stay below any vocab
size), its chat template, its BOS convention and its stop tokens:

    gpt2         mlxpost's bundled format (mlxpost/templates.py), the same tokenizer as
                 build_tokenizer
    qwen2, qwen3 ChatML: <|im_start|>role\\n...<|im_end|>\\n, no BOS, EOS <|im_end|>,
                 pad <|endoftext|>, generation stops at [<|im_end|>, <|endoftext|>]
    llama        Llama 3: <|begin_of_text|> from the template and the post-processor,
                 <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>, EOS <|eot_id|>,
                 generation stops at [<|end_of_text|>, <|eot_id|>]
    mistral      <s> from the template and the post-processor, [INST] ...[/INST] answer</s>
                 ([INST] and [/INST] control tokens, as in Mistral's v3 tokenizer), EOS </s>
    gemma2,      <bos> from the template and the post-processor,
    gemma3_text  <start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n, EOS <eos>,
                 generation stops at [<eos>, <end_of_turn>]
    phi3         <|user|>\\n...<|end|>\\n<|assistant|>\\n, no BOS, EOS <|end|>,
                 pad <|endoftext|>, generation stops at [<|endoftext|>, <|end|>]

Templates that fold a system message into the first user turn (Mistral, Gemma) join the
two with a blank line.

    python scripts/tiny_tokenizers.py --arch llama --output /tmp/tok
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mlxpost.templates import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS

# The text every family's tokenizer is trained on, besides one conversation in its format.
PLAIN_TEXT = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 7",
    "The quick brown fox jumps over the lazy dog.",
    "<think>First add the numbers, then check the result.</think> The answer is 12.",
    "def add(a, b):\n    return a + b\n",
]
SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Please summarise the text."},
    {"role": "assistant", "content": "Here is a short summary."},
]
REPEATS = 20

# Jinja pieces shared by the templates below. A leading system message is split off as
# `system` and the rest of the conversation is `turns`; unknown roles are an error.
SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
)
BAD_ROLE = "{{ raise_exception('unsupported role ' + message['role']) }}"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

MISTRAL_TEMPLATE = (
    SPLIT_SYSTEM + "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = message['content'] %}"
    "{% if loop.first and system %}{% set text = system + '\\n\\n' + text %}{% endif %}"
    "{{ '[INST] ' + text + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + eos_token }}"
    "{% else %}" + BAD_ROLE + "{% endif %}"
    "{% endfor %}"
)

GEMMA_TEMPLATE = (
    SPLIT_SYSTEM + "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% elif message['role'] == 'user' %}{% set role = 'user' %}"
    "{% else %}" + BAD_ROLE + "{% endif %}"
    "{% set text = message['content'] | trim %}"
    "{% if loop.first and system %}{% set text = system + '\\n\\n' + text %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + text + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'user', 'assistant') %}"
    "{% if message['role'] != 'system' or message['content'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% else %}" + BAD_ROLE + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    special_tokens: tuple[str, ...]  # ids 0, 1, ... in this order
    chat_template: str
    eos: str  # the tokenizer's eos_token, appended to plain-text documents
    end_of_turn: str  # what closes an assistant turn under the template
    stop: tuple[str, ...]  # generation_config.json's eos_token_id, in order
    pad: str | None = None
    bos: str | None = None
    unk: str | None = None
    # Plain encoding (add_special_tokens=True) prepends `bos`, as the family's tokenizer does.
    bos_on_encode: bool = False

    @property
    def additional(self) -> tuple[str, ...]:
        """The special tokens that are not eos, pad, bos or unk (turn markers)."""
        named = {self.eos, self.pad, self.bos, self.unk}
        return tuple(token for token in self.special_tokens if token not in named)


BUNDLED = Family(
    special_tokens=tuple(SPECIAL_TOKENS),
    chat_template=CHAT_TEMPLATE,
    eos=END,
    end_of_turn=END,
    stop=(END,),
    pad=PAD,
)
CHATML = Family(
    special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>"),
    chat_template=CHATML_TEMPLATE,
    eos="<|im_end|>",
    end_of_turn="<|im_end|>",
    stop=("<|im_end|>", "<|endoftext|>"),
    pad="<|endoftext|>",
)
LLAMA3 = Family(
    special_tokens=(
        "<|finetune_right_pad_id|>",
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
    ),
    chat_template=LLAMA3_TEMPLATE,
    eos="<|eot_id|>",
    end_of_turn="<|eot_id|>",
    stop=("<|end_of_text|>", "<|eot_id|>"),
    pad="<|finetune_right_pad_id|>",
    bos="<|begin_of_text|>",
    bos_on_encode=True,
)
MISTRAL = Family(
    special_tokens=("<unk>", "</s>", "<s>", "[INST]", "[/INST]"),
    chat_template=MISTRAL_TEMPLATE,
    eos="</s>",
    end_of_turn="</s>",
    stop=("</s>",),
    bos="<s>",
    unk="<unk>",
    bos_on_encode=True,
)
GEMMA = Family(
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    chat_template=GEMMA_TEMPLATE,
    eos="<eos>",
    end_of_turn="<end_of_turn>",
    stop=("<eos>", "<end_of_turn>"),
    pad="<pad>",
    bos="<bos>",
    unk="<unk>",
    bos_on_encode=True,
)
PHI3 = Family(
    special_tokens=("<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
    chat_template=PHI3_TEMPLATE,
    eos="<|end|>",
    end_of_turn="<|end|>",
    stop=("<|endoftext|>", "<|end|>"),
    pad="<|endoftext|>",
)

FAMILIES = {
    "gpt2": BUNDLED,
    "qwen2": CHATML,
    "qwen3": CHATML,
    "llama": LLAMA3,
    "mistral": MISTRAL,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "phi3": PHI3,
}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def render(spec: Family, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template rendered as transformers renders it, without a tokenizer."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(spec.chat_template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=spec.bos or "",
        eos_token=spec.eos,
        raise_exception=raise_exception,
    )


def corpus(spec: Family) -> list[str]:
    conversation = render(spec, SAMPLE_CONVERSATION).strip()
    return (PLAIN_TEXT[:2] + [conversation] + PLAIN_TEXT[2:]) * REPEATS


def family_tokenizer(arch: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` ids with `arch`'s family conventions."""
    spec = family(arch)
    if len(spec.special_tokens) + 256 > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the byte alphabet")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(spec), trainer=trainer)
    if spec.bos_on_encode:
        bos = (spec.bos, tokenizer.token_to_id(spec.bos))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos}:1 $B:1", special_tokens=[bos]
        )
    names = {
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "bos_token": spec.bos,
        "unk_token": spec.unk,
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{key: value for key, value in names.items() if value is not None},
        additional_special_tokens=list(spec.additional) or None,
    )
    fast.chat_template = spec.chat_template
    return fast


def generation_eos_ids(arch: str, tokenizer) -> list[int]:
    """generation_config.json's eos_token_id: every token generation stops at."""
    return [tokenizer.convert_tokens_to_ids(token) for token in family(arch).stop]


def save_family_tokenizer(arch: str, vocab_size: int, output: str) -> PreTrainedTokenizerFast:
    """Write `arch`'s family tokenizer to `output`, and its stop tokens as eos_token_id of
    generation_config.json (updating the one save_pretrained wrote from the model config)."""
    tokenizer = family_tokenizer(arch, vocab_size)
    tokenizer.save_pretrained(output)
    path = os.path.join(output, "generation_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config.pop("_from_model_config", None)  # no longer the model config's values
    eos = generation_eos_ids(arch, tokenizer)
    config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=tuple(FAMILIES))
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, default=320)
    args = parser.parse_args()
    save_family_tokenizer(args.arch, args.vocab_size, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
