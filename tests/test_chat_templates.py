"""Chat templates, BOS and EOS of each family's tiny tokenizer (scripts/tiny_tokenizers.py):
the published formats, exact prompt/completion splits, one BOS where the family has one,
and every stop token in TokenizerInfo.eos_ids."""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mlxpost.backend_shared.sampling import assemble
from mlxpost.data import (
    ChatEncoder,
    ChatExample,
    PreferenceExample,
    PromptExample,
    TokenizeConfig,
    tokenize_examples,
    tokenize_preferences,
)
from mlxpost.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_tokenizers

ARCHS = tuple(tiny_tokenizers.FAMILIES)
WITH_BOS = ("llama", "mistral", "gemma2", "gemma3_text")
VOCAB_SIZE = 320


def msg(role, content):
    return {"role": role, "content": content}


TWO_TURNS = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "How are you?")]

# The rendered prompt of TWO_TURNS with a generation prompt, as each family publishes it.
PUBLISHED = {
    "gpt2": "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nHow are you?<|end|>\n"
    "<|assistant|>\n",
    "qwen2": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    "llama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Hi[/INST] Hello</s>[INST] How are you?[/INST]",
    "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nHow are you?<|end|>\n"
    "<|assistant|>\n",
}
PUBLISHED["qwen3"] = PUBLISHED["qwen2"]
PUBLISHED["gemma3_text"] = PUBLISHED["gemma2"]

# A system message: its own turn, or folded into the first user turn.
WITH_SYSTEM = [msg("system", "Be brief."), msg("user", "Hi")]
PUBLISHED_SYSTEM = {
    "gpt2": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    "qwen2": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST]",
    "gemma2": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
}
PUBLISHED_SYSTEM["qwen3"] = PUBLISHED_SYSTEM["qwen2"]
PUBLISHED_SYSTEM["gemma3_text"] = PUBLISHED_SYSTEM["gemma2"]


@pytest.fixture(scope="module")
def tokenizers():
    return {arch: tiny_tokenizers.family_tokenizer(arch, VOCAB_SIZE) for arch in ARCHS}


def bos_count(tokenizer, ids):
    bos = tokenizer.bos_token_id
    return 0 if bos is None else sum(i == bos for i in ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_rendered_prompt_is_the_published_format(tokenizers, arch):
    tokenizer = tokenizers[arch]

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert render(TWO_TURNS) == PUBLISHED[arch]
    assert render(WITH_SYSTEM) == PUBLISHED_SYSTEM[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_are_single_ids_below_the_vocab_size(tokenizers, arch):
    tokenizer = tokenizers[arch]
    spec = tiny_tokenizers.FAMILIES[arch]
    assert len(tokenizer) == VOCAB_SIZE
    for token_id, token in enumerate(spec.special_tokens):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.eos_token == spec.eos and tokenizer.bos_token == spec.bos


@pytest.mark.parametrize("arch", ARCHS)
def test_split_is_exact_and_the_completion_ends_the_turn(tokenizers, arch):
    tokenizer = tokenizers[arch]
    end_of_turn = tokenizer.convert_tokens_to_ids(tiny_tokenizers.FAMILIES[arch].end_of_turn)
    prompt = TWO_TURNS
    completion = [msg("assistant", "Fine, thanks.")]
    [encoded], _ = tokenize_examples([ChatExample(prompt, completion)], tokenizer)

    def ids(messages, generation_prompt):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # The prompt is the generation-prompt rendering, prompt + completion the whole one.
    assert encoded.input_ids[: encoded.prompt_length] == ids(prompt, True)
    assert encoded.input_ids == ids(prompt + completion, False)
    tail = encoded.input_ids[encoded.prompt_length :]
    assert tokenizer.decode(tail).strip().startswith("Fine, thanks.")
    # The turn-end token is the last one but template whitespace, and it is trained on.
    last = max(i for i, token in enumerate(encoded.input_ids) if token == end_of_turn)
    assert last >= encoded.prompt_length
    assert tokenizer.decode(encoded.input_ids[last + 1 :]).strip() == ""
    assert encoded.loss_mask[last] == 1
    assert encoded.loss_mask == [0] * encoded.prompt_length + [1] * len(tail)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_bos_under_the_template_where_the_family_has_one(tokenizers, arch):
    tokenizer = tokenizers[arch]
    examples = [
        ChatExample(TWO_TURNS, [msg("assistant", "Fine.")]),
        ChatExample(WITH_SYSTEM, [msg("assistant", "Hello")]),
    ]
    encoded, _ = tokenize_examples(examples, tokenizer)
    [prompt], _ = tokenize_examples([PromptExample(TWO_TURNS, {})], tokenizer)
    pair = PreferenceExample(TWO_TURNS, [msg("assistant", "Fine.")], [msg("assistant", "No.")])
    [(chosen, rejected)], _ = tokenize_preferences([pair], tokenizer)
    for example in encoded + [prompt, chosen, rejected]:
        if arch in WITH_BOS:
            assert example.input_ids[0] == tokenizer.bos_token_id
            assert bos_count(tokenizer, example.input_ids) == 1
        else:
            assert tokenizer.bos_token_id is None


def test_a_template_that_repeats_bos_still_gives_one(tokenizers):
    tokenizer = copy.deepcopy(tokenizers["llama"])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    [encoded], _ = tokenize_examples([ChatExample(TWO_TURNS, [msg("assistant", "Ok")])], tokenizer)
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert bos_count(tokenizer, encoded.input_ids) == 1


def plain_encodings(tokenizer):
    """TokenizedExamples without a template: a raw text, both plain prompt modes, a prompt."""
    text = ChatExample([], None, "the quick fox")
    chat = ChatExample([msg("user", "Hi")], [msg("assistant", "Hello")])
    [document], _ = tokenize_examples([text], tokenizer)
    [random_format], _ = tokenize_examples([chat], tokenizer, TokenizeConfig(template="random"))
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        [fallback], _ = tokenize_examples([chat], no_template)
        [prompt], _ = tokenize_examples([PromptExample([msg("user", "Hi")], {})], no_template)
    return document, random_format, fallback, prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_text_gets_bos_where_the_tokenizer_adds_it(tokenizers, arch):
    tokenizer = tokenizers[arch]
    adds_bos = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert adds_bos == (arch in WITH_BOS)
    document, random_format, fallback, prompt = plain_encodings(tokenizer)
    for example in (document, random_format, fallback, prompt):
        assert bos_count(tokenizer, example.input_ids) == (1 if adds_bos else 0)
        if adds_bos:
            assert example.input_ids[0] == tokenizer.bos_token_id
    for example in (document, random_format, fallback):
        assert example.input_ids[-1] == tokenizer.eos_token_id
        assert example.loss_mask[-1] == 1
    # BOS is the prompt's (or, for a document, the unpredicted first token's): no loss on it.
    assert document.loss_mask == [0] + [1] * (len(document.input_ids) - 1)
    plain = document.input_ids[1:-1] if adds_bos else document.input_ids[:-1]
    assert plain == tokenizer("the quick fox", add_special_tokens=False)["input_ids"]


def test_gpt2_keeps_the_bundled_tokenizer(tiny_builder):
    bundled = tiny_builder.build_tokenizer(VOCAB_SIZE)
    family = tiny_tokenizers.family_tokenizer("gpt2", VOCAB_SIZE)
    assert family.get_vocab() == bundled.get_vocab()
    model = json.loads(family.backend_tokenizer.to_str())["model"]
    assert model == json.loads(bundled.backend_tokenizer.to_str())["model"]
    assert family.chat_template == bundled.chat_template
    assert (family.eos_token_id, family.pad_token_id) == (bundled.eos_token_id, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_tokenizer_returns_every_eos_id(tiny_dir, arch):
    path = tiny_dir / f"tiny-{arch}"
    info = load_tokenizer(str(path))
    tokenizer = info.tokenizer
    spec = tiny_tokenizers.FAMILIES[arch]
    stop = [tokenizer.convert_tokens_to_ids(token) for token in spec.stop]
    written = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert written == (stop if len(stop) > 1 else stop[0])
    assert info.eos_ids[0] == tokenizer.eos_token_id
    assert set(info.eos_ids) == set(stop) | {tokenizer.eos_token_id}
    assert len(info.eos_ids) == len(set(info.eos_ids))
    end_of_turn = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    assert end_of_turn in info.eos_ids
    if spec.pad is not None:
        assert info.pad_id == tokenizer.convert_tokens_to_ids(spec.pad)
    # The checkpoint's tokenizer encodes as the family's: BOS where it has one.
    encoder = ChatEncoder(tokenizer)
    assert encoder.plain_bos == (arch in WITH_BOS)
    config = json.loads((path / "config.json").read_text())
    assert max(tokenizer.all_special_ids) < config["vocab_size"]


def test_sampling_finishes_at_any_eos_id():
    # Rows stop at the second and first of the stop ids; the third runs to the budget.
    eos_ids, pad_id = [7, 5], 0
    tokens = np.array([[3, 5, 9], [7, 9, 9], [3, 4, 6]])
    live = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    prompt = np.ones((3, 2), np.int32)
    samples = assemble(prompt, prompt, tokens, np.zeros(tokens.shape), live, 1, eos_ids, pad_id)
    assert samples.finished.tolist() == [True, True, False]
