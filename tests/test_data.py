"""The data pipeline: formats per command, loading, tokenisation, filters and `data check`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxpost.data import (
    COMMANDS,
    PLAIN_FORMATS,
    ChatEncoder,
    ChatExample,
    PreferenceExample,
    PromptExample,
    TokenizeConfig,
    UnpairedExample,
    apply_filters,
    check_dataset,
    deduplicate,
    filter_length,
    filter_quality,
    format_check_report,
    load_examples,
    load_records,
    near_deduplicate,
    normalise_records,
    pad_batch,
    pad_masks,
    tokenize_examples,
    tokenize_preferences,
)
from mlxpost.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
USER = "user"
ASSISTANT = "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny BPE tokenizer with the bundled chat template (scripts/build_tiny_models.py)."""
    pytest.importorskip("torch")  # the builder module imports torch
    spec = importlib.util.spec_from_file_location(
        "build_tiny_models", ROOT / "scripts" / "build_tiny_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(str(path))
    return path


# --- formats ----------------------------------------------------------------

HH_CHOSEN = (
    "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: It is 4, yes."
)
HH_REJECTED = (
    "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: It is five."
)
HH_PROMPT = [msg(USER, "What is 2+2?"), msg(ASSISTANT, "It is 4."), msg(USER, "Sure?")]

CASES = [
    # (command, row, format, expected example)
    (
        "sft",
        {"messages": [msg("system", "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hello")]},
        "conversational",
        ChatExample([msg("system", "Be brief."), msg(USER, "Hi")], [msg(ASSISTANT, "Hello")]),
    ),
    (
        "sft",
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        },
        "sharegpt",
        ChatExample([msg("system", "S"), msg(USER, "Hi")], [msg(ASSISTANT, "Hello")]),
    ),
    (
        "sft",
        {"prompt": "Hi", "completion": "Hello"},
        "prompt-completion",
        ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")]),
    ),
    (
        "distill",
        {"prompt": [msg(USER, "Hi")], "completion": [msg(ASSISTANT, "Hello")]},
        "prompt-completion",
        ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")]),
    ),
    (
        "sft",
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        "alpaca",
        ChatExample([msg(USER, "Translate\n\nchat")], [msg(ASSISTANT, "cat")]),
    ),
    (
        "sft",
        {"instruction": "Say hi", "input": "", "output": "hi"},
        "alpaca",
        ChatExample([msg(USER, "Say hi")], [msg(ASSISTANT, "hi")]),
    ),
    (
        "sft",
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        "gsm8k",
        ChatExample([msg(USER, "1+1?")], [msg(ASSISTANT, "1+1=2\n#### 2")]),
    ),
    ("distill", {"text": "Once upon a time"}, "text", ChatExample([], None, "Once upon a time")),
    (
        "dpo",
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
        "explicit-preference",
        PreferenceExample(
            [msg(USER, "Hi")], [msg(ASSISTANT, "Hello")], [msg(ASSISTANT, "Go away")]
        ),
    ),
    (
        "rm",
        {
            "prompt": [msg(USER, "Hi")],
            "chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")],  # prompt repeated: stripped
            "rejected": [msg(ASSISTANT, "Go away")],
            "margin": 2,
        },
        "explicit-preference",
        PreferenceExample(
            [msg(USER, "Hi")], [msg(ASSISTANT, "Hello")], [msg(ASSISTANT, "Go away")], 2.0
        ),
    ),
    (
        "rm",
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        "implicit-preference",
        PreferenceExample(
            HH_PROMPT, [msg(ASSISTANT, "It is 4, yes.")], [msg(ASSISTANT, "It is five.")]
        ),
    ),
    (
        "dpo",
        {
            "chosen": [msg(USER, "Hi"), msg(ASSISTANT, "Hello")],
            "rejected": [msg(USER, "Hi"), msg(ASSISTANT, "Go away")],
        },
        "implicit-preference",
        PreferenceExample(
            [msg(USER, "Hi")], [msg(ASSISTANT, "Hello")], [msg(ASSISTANT, "Go away")]
        ),
    ),
    (
        "kto",
        {"prompt": "Hi", "completion": "Go away", "label": False},
        "unpaired-preference",
        UnpairedExample([msg(USER, "Hi")], [msg(ASSISTANT, "Go away")], False),
    ),
    (
        "grpo",
        {"prompt": "2+3?", "answer": "5", "source": "toy"},
        "prompt",
        PromptExample([msg(USER, "2+3?")], {"answer": "5", "source": "toy", "answer_number": "5"}),
    ),
    (
        "ppo",
        {"prompt": [msg("system", "S"), msg(USER, "Hi")]},
        "prompt",
        PromptExample([msg("system", "S"), msg(USER, "Hi")], {}),
    ),
    (
        "grpo",
        {"question": "Tom has 3+4 apples?", "answer": "3+4=7\n#### 7"},
        "gsm8k",
        PromptExample(
            [msg(USER, "Tom has 3+4 apples?")], {"answer": "3+4=7\n#### 7", "answer_number": "7"}
        ),
    ),
    (
        "eval-math",
        {"question": "1,000+234?", "answer": "so\n#### 1,234"},
        "gsm8k",
        PromptExample(
            [msg(USER, "1,000+234?")], {"answer": "so\n#### 1,234", "answer_number": "1234"}
        ),
    ),
    (
        "eval-math",
        {"prompt": "6*7?", "answer": 42},
        "prompt-answer",
        PromptExample([msg(USER, "6*7?")], {"answer": 42, "answer_number": "42"}),
    ),
]


@pytest.mark.parametrize("command, row, expected_format, expected", CASES)
def test_every_format_is_detected_and_normalised(tmp_path, command, row, expected_format, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    name, examples = load_examples(path, command)
    assert name == expected_format
    assert examples == [expected]


def test_every_command_has_a_case():
    assert {case[0] for case in CASES} == set(COMMANDS)


def test_kto_unpairs_paired_preferences():
    rows = [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}]
    name, examples = normalise_records(rows, "kto")
    assert name == "explicit-preference"
    assert examples == [
        UnpairedExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")], True),
        UnpairedExample([msg(USER, "Hi")], [msg(ASSISTANT, "Go away")], False),
    ]


def test_hh_split_keeps_shared_response_prefix_in_the_completions():
    # Both answers start "It is ": the prompt must still end at the last "Assistant:".
    [example] = normalise_records([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "dpo")[1]
    assert example.prompt_messages == HH_PROMPT
    assert example.chosen_messages[0]["content"].startswith("It is 4")
    assert example.rejected_messages[0]["content"] == "It is five."


def test_hh_split_single_turn_and_preamble():
    row = {
        "chosen": "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!",
        "rejected": "Be kind.\n\nHuman: Hi\n\nAssistant: Go away.",
    }
    [example] = normalise_records([row], "rm")[1]
    assert example.prompt_messages == [msg("system", "Be kind."), msg(USER, "Hi")]
    assert example.chosen_messages == [msg(ASSISTANT, "Hello!")]


def test_hh_without_assistant_marker_is_an_error():
    with pytest.raises(UserError, match=r"data: row 0, column 'chosen': .*Assistant"):
        normalise_records([{"chosen": "good", "rejected": "bad"}], "dpo")


@pytest.mark.parametrize(
    "row, fragments",
    [
        ({"messages": "hi"}, ["'messages'", "a list of {role, content}", "a string"]),
        ({"messages": [{"role": "user"}]}, ["'messages'", "message 0"]),
        ({"messages": [msg(USER, "Hi")]}, ["'messages'", "not the assistant"]),
        ({"prompt": 3, "completion": "x"}, ["'prompt'", "got a number"]),
        ({"conversations": [{"from": "bot", "value": "x"}]}, ["'conversations'", "'bot'"]),
        ({"text": None}, ["'text'", "got null"]),
    ],
)
def test_wrong_type_names_file_row_and_column(tmp_path, row, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UserError) as err:
        load_examples(path, "sft")
    assert str(err.value).startswith(f"{path}: row 0, column ")
    for fragment in fragments:
        assert fragment in str(err.value)


def test_wrong_type_in_a_later_row():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": {"x": 1}}]
    with pytest.raises(UserError, match="^d.csv: row 1, column 'completion': .*got an object$"):
        normalise_records(rows, "sft", "d.csv")


def test_wrong_label_and_margin_types():
    with pytest.raises(UserError, match="row 0, column 'label': expected true or false"):
        normalise_records([{"prompt": "a", "completion": "b", "label": "yes"}], "kto")
    with pytest.raises(UserError, match="column 'margin': expected a number"):
        normalise_records([{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1"}], "rm")


def test_eval_math_needs_a_number():
    with pytest.raises(UserError, match="column 'answer': no number"):
        normalise_records([{"question": "q", "answer": "none"}], "eval-math")


def test_missing_column_lists_needed_and_found():
    with pytest.raises(UserError) as err:
        normalise_records([{"chosen": "a", "rejected": "b"}], "grpo", "x.jsonl")
    assert str(err.value) == (
        "x.jsonl: missing column(s) for grpo: needs one of [prompt | question]; "
        "found [chosen, rejected]"
    )


# --- loading ----------------------------------------------------------------


def test_malformed_json_line_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: not valid JSON \(.*column 14\)$"):
        load_records(path)


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(UserError, match=":2: expected a JSON object, got a list"):
        load_records(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at offset 13\)$"):
        load_records(path)


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "")])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=rf"^{path}: no examples$"):
        load_records(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}/nope.jsonl: not found$"):
        load_records(tmp_path / "nope.jsonl")
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(
        UserError, match=r"unsupported file type '\.txt'; supported: \.jsonl, \.json"
    ):
        load_records(path)
    with pytest.raises(UserError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path)


def test_json_list_data_key_and_mislabelled_jsonl(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "lines.json", rows)
    for name in ("list.json", "data.json", "lines.json"):
        assert load_records(tmp_path / name) == rows


def test_parquet_csv_and_save_to_disk(tmp_path):
    import datasets

    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "Bye", "completion": "See you"},
    ]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    dataset.save_to_disk(str(tmp_path / "disk"))
    other = datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}])
    datasets.DatasetDict({"train": dataset, "test": other}).save_to_disk(str(tmp_path / "dict"))
    for name in ("d.parquet", "d.csv", "disk", "dict"):
        assert load_records(tmp_path / name) == rows, name
    assert load_records(tmp_path / "dict", split="test") == other.to_list()
    with pytest.raises(UserError, match="no split 'dev'; splits: train, test"):
        load_records(tmp_path / "dict", split="dev")


def test_hub_names_come_from_the_local_cache_only(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a Hub name must not be looked up on the network")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(UserError, match="no dataset of that name in the local Hugging Face cache"):
        load_records("org/name")
    snapshot = tmp_path / "hub" / "datasets--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    write_jsonl(snapshot / "train.jsonl", [{"text": "cached"}])
    monkeypatch.undo()  # datasets reads the snapshot itself
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    assert load_records("org/name") == [{"text": "cached"}]


# --- tokenisation -----------------------------------------------------------


def test_chat_tokenisation_masks_the_completion(tokenizer):
    example = ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")])
    [encoded], report = tokenize_examples([example], tokenizer)
    prompt = tokenizer.apply_chat_template(
        [msg(USER, "Hi")], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[: encoded.prompt_length] == prompt_ids
    completion = encoded.input_ids[encoded.prompt_length :]
    assert tokenizer.decode(completion) == "Hello<|end|>\n"
    assert encoded.loss_mask == [0] * len(prompt_ids) + [1] * len(completion)
    assert report["kept"] == 1 and report["truncated"] == 0

    [everything], _ = tokenize_examples([example], tokenizer, TokenizeConfig(completion_only=False))
    assert everything.loss_mask == [0] + [1] * (len(everything.input_ids) - 1)


def test_plain_text_loss_on_all_but_first_token(tokenizer):
    [encoded], _ = tokenize_examples([ChatExample([], None, "the quick fox")], tokenizer)
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.prompt_length == 0
    assert encoded.loss_mask == [0] + [1] * (len(encoded.input_ids) - 1)


def test_preference_pairs_share_the_prompt(tokenizer):
    example = PreferenceExample(
        [msg(USER, "Hi")], [msg(ASSISTANT, "Hello")], [msg(ASSISTANT, "No")]
    )
    [(chosen, rejected)], report = tokenize_preferences([example], tokenizer)
    assert chosen.prompt_length == rejected.prompt_length
    assert chosen.input_ids[: chosen.prompt_length] == rejected.input_ids[: rejected.prompt_length]
    assert chosen.input_ids != rejected.input_ids and report["kept"] == 1


def test_prompts_have_a_generation_prompt(tokenizer):
    [encoded], _ = tokenize_examples([PromptExample([msg(USER, "Hi")], {})], tokenizer)
    assert tokenizer.decode(encoded.input_ids).endswith("<|assistant|>\n")
    assert sum(encoded.loss_mask) == 0


def test_too_long_dropped_or_truncated(tokenizer):
    short = ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")])
    long = ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "The quick brown fox " * 5)])
    long_prompt = ChatExample([msg(USER, "The quick brown fox " * 5)], [msg(ASSISTANT, "ok")])
    examples = [short, long, long_prompt]
    limit = 20
    kept, report = tokenize_examples(examples, tokenizer, TokenizeConfig(max_length=limit))
    assert [k.index for k in kept] == [0]
    assert report["dropped_too_long"] == 2 and report["truncated"] == 0
    config = TokenizeConfig(max_length=limit, on_too_long="truncate")
    kept, report = tokenize_examples(examples, tokenizer, config)
    assert [k.index for k in kept] == [0, 1]
    assert report["truncated"] == 1 and report["dropped_prompt_too_long"] == 1
    assert len(kept[1].input_ids) == limit and kept[1].truncated
    assert kept[1].input_ids[: kept[1].prompt_length] == kept[0].input_ids[: kept[0].prompt_length]


def test_bad_tokenize_options():
    with pytest.raises(UserError, match="on_too_long"):
        TokenizeConfig(on_too_long="cut")
    with pytest.raises(UserError, match="template mode"):
        TokenizeConfig(template="chatml")


def test_template_that_rewrites_the_prompt_is_an_error(tokenizer):
    import copy

    broken = copy.deepcopy(tokenizer)
    # Earlier messages are trimmed, the last one is not: with a completion after
    # it, the prompt's trailing spaces vanish and the prompt is no longer a prefix.
    broken.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'] | trim }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    examples = [
        ChatExample([msg(USER, "fine")], [msg(ASSISTANT, "ok")]),
        ChatExample([msg(USER, "Hi   ")], [msg(ASSISTANT, "Hello")]),
    ]
    with pytest.raises(UserError, match="^example 1: the chat template renders the prompt"):
        tokenize_examples(examples, broken)


def test_no_chat_template_falls_back_and_warns(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    examples = [ChatExample([msg(USER, "Hi")], [msg(ASSISTANT, "Hello")])] * 2
    with pytest.warns(UserWarning, match="no chat template") as warned:
        encoded, _ = tokenize_examples(examples, plain)
    assert len(warned) == 1
    assert plain.decode(encoded[0].input_ids) == "Hi\nHello<|end|>"
    assert encoded[0].input_ids[-1] == plain.eos_token_id


def test_random_templates_are_seeded_and_varied(tokenizer):
    examples = [ChatExample([msg(USER, f"Task {i}")], [msg(ASSISTANT, "Done")]) for i in range(40)]

    def render(seed):
        config = TokenizeConfig(template="random", seed=seed)
        encoded, _ = tokenize_examples(examples, tokenizer, config)
        for e in encoded:
            assert e.input_ids[-1] == tokenizer.eos_token_id
            assert sum(e.loss_mask) == len(e.input_ids) - e.prompt_length
        return [tokenizer.decode(e.input_ids[: e.prompt_length]) for e in encoded]

    first = render(0)
    assert first == render(0)
    assert first != render(1)
    # Every prompt is one of the formats, and at least four of them occur.
    used = {
        next(fmt for fmt in PLAIN_FORMATS if text == fmt.replace("{prompt}", f"Task {i}"))
        for i, text in enumerate(first)
    }
    assert len(used) >= 4
    # The choice depends on the example's index, not on what else is in the list.
    encoder = ChatEncoder(tokenizer, TokenizeConfig(template="random", seed=0))
    assert tokenizer.decode(encoder.encode(examples[7], 7).input_ids).startswith(first[7])


def test_pad_batch_right_and_left():
    ids, attention = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == np.int32 and attention.dtype == np.int32
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, attention = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left", length=4)
    assert ids.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert attention.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pad_masks([[0, 1], [1]], side="left").tolist() == [[0, 1], [0, 1]]


# --- filters ----------------------------------------------------------------


def chat(prompt, completion):
    return ChatExample([msg(USER, prompt)], [msg(ASSISTANT, completion)])


def test_quality_filter_counts():
    examples = [
        chat("Add 2 and 3", "The sum is 5."),
        chat("Say something", "   "),
        chat("Repeat", "I am a loop " * 20),
        chat("Draw", "#### $$$ %%% ^^^ &&& *** ((( )))"),
    ]
    kept, report = filter_quality(examples)
    assert kept == examples[:1]
    assert report["dropped"] == 3
    assert report["reasons"] == {"empty_completion": 1, "repetitive": 1, "non_alphanumeric": 1}


def test_length_filter_counts(tokenizer):
    examples = [chat("a", "b"), chat("Hello", "world"), chat("x" * 50, "y" * 50)]
    kept, report = filter_length(examples, min_chars=5, max_chars=40)
    assert kept == examples[1:2] and report["reasons"] == {"too_short": 1, "too_long": 1}
    kept, report = filter_length(examples, min_tokens=4, max_tokens=50, tokenizer=tokenizer)
    assert kept == examples[1:2] and report["reasons"] == {"too_short": 1, "too_long": 1}


def test_exact_duplicates_ignore_case_and_spacing():
    examples = [chat("Hi there", "Hello"), chat("hi   THERE", "hello "), chat("Hi there", "Bye")]
    kept, report = deduplicate(examples)
    assert kept == [examples[0], examples[2]]
    assert report["reasons"] == {"exact_duplicate": 1}


def test_near_duplicates_are_deterministic():
    base = "the cat sat on the mat and looked out of the window at the birds in the garden"
    examples = [
        chat("Describe", base),
        chat("Describe", base + " today"),  # one word more: Jaccard well above 0.8
        chat("Describe", "a completely different sentence about quantum field theory and ducks"),
        chat(
            "Describe", base.replace("cat", "dog").replace("birds", "trees").replace("mat", "rug")
        ),
    ]
    kept, report = near_deduplicate(examples, threshold=0.8)
    assert kept == [examples[0], examples[2], examples[3]]
    assert report["reasons"] == {"near_duplicate": 1} and report["threshold"] == 0.8
    assert near_deduplicate(examples, threshold=0.8)[0] == kept
    kept_loose, _ = near_deduplicate(examples, threshold=0.3)
    assert len(kept_loose) == 2


def test_apply_filters_reports_each_step():
    examples = [chat("Hi", "Hello"), chat("Hi", "Hello"), chat("Hi", "")]
    kept, reports = apply_filters(examples)
    assert [r["filter"] for r in reports] == ["quality", "duplicates", "near_duplicates"]
    assert [r["dropped"] for r in reports] == [1, 1, 0] and len(kept) == 1


# --- check_dataset and the CLI ----------------------------------------------


def test_check_dataset_report(tmp_path, tokenizer):
    rows = [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Hi", "completion": "Hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_dataset(path, "sft", tokenizer=tokenizer, max_length=8)
    assert report["usable"] and report["format"] == "prompt-completion"
    assert report["rows"] == 2 and report["columns"] == ["prompt", "completion"]
    assert report["sample"]["prompt_messages"] == [msg(USER, "Hi")]
    assert report["lengths"]["tokens"]["max"] > 8
    assert report["length_handling"]["dropped_too_long"] == 2
    assert report["kept_after_filters"] == 1
    text = format_check_report(report)
    assert "prompt-completion" in text and "length (tokens)" in text
    unusable = check_dataset(path, "dpo")
    assert not unusable["usable"] and "missing column(s) for dpo" in unusable["reason"]
    assert "not usable for dpo" in format_check_report(unusable)


@pytest.mark.parametrize("command, row, expected_format, expected", CASES)
def test_check_dataset_tokenizes_every_format(
    tmp_path, tokenizer, command, row, expected_format, expected
):
    path = write_jsonl(tmp_path / "data.jsonl", [row, row])
    report = check_dataset(path, command, tokenizer=tokenizer)
    assert report["usable"], report["reason"]
    assert report["format"] == expected_format and report["lengths"]["tokens"]["min"] > 0
    assert report["filters"][1]["dropped"] == 1  # the repeated row


def test_cli_commands_match_the_library():
    from mlxpost.commands.data import DATA_COMMANDS

    assert sorted(DATA_COMMANDS) == sorted(COMMANDS)


def test_cli_check_usable(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    result = run_cli("data", "check", str(path), "--for", "grpo", "--model", str(tokenizer_dir))
    assert result.returncode == 0, result.stderr
    assert "format: gsm8k" in result.stdout and "length (tokens)" in result.stdout
    result = run_cli("data", "check", str(path), "--for", "eval-math", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["usable"] and report["sample"]["extras"]["answer_number"] == "2"


def bad_inputs(tmp_path):
    """(path, --for, expected fragments) of every input the CLI must refuse."""
    cases = []
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "a"}\n{"text": \n')
    cases.append((malformed, "sft", [f"{malformed}:2: not valid JSON"]))
    columns = write_jsonl(tmp_path / "columns.jsonl", [{"chosen": "a"}])
    cases.append((columns, "dpo", ["missing column(s) for dpo", "found [chosen]"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((empty, "sft", [f"{empty}: no examples"]))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "\xff"}\n')
    cases.append((latin, "sft", [f"{latin}: not UTF-8 text (byte 0xff at offset 10)"]))
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": ["x"], "completion": "y"}])
    cases.append((typed, "sft", [f"{typed}: row 0, column 'prompt'", "message 0"]))
    unknown = tmp_path / "data.xlsx"
    unknown.write_text("x")
    cases.append((unknown, "sft", ["unsupported file type '.xlsx'", ".parquet"]))
    cases.append((tmp_path / "missing.jsonl", "sft", ["missing.jsonl: not found"]))
    cases.append(
        ("someorg/somedata", "sft", ["no dataset of that name in the local Hugging Face cache"])
    )
    return cases


def test_cli_missing_model_directory(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    result = run_cli("data", "check", str(path), "--for", "sft", "--model", "org/missing")
    assert_user_error(result, "org/missing: not found")


def test_cli_refuses_bad_input(tmp_path):
    for path, command, fragments in bad_inputs(tmp_path):
        assert_user_error(run_cli("data", "check", str(path), "--for", command), *fragments)


def test_cli_template_split_error(tmp_path, tokenizer_dir):
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(tokenizer_dir):
        (model / name).write_bytes((tokenizer_dir / name).read_bytes())
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] | trim if not loop.last else m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi  ", "completion": "Hello"}])
    result = run_cli("data", "check", str(path), "--for", "sft", "--model", str(model), "--json")
    assert_user_error(result, "example 0: the chat template renders the prompt differently")
    assert json.loads(result.stdout)["usable"] is False


def test_comma_separated_datasets_are_concatenated(tmp_path):
    explicit = tmp_path / "explicit.jsonl"
    explicit.write_text(
        json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n"
    )
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
                "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: No.",
            }
        )
        + "\n"
    )
    fmt, examples = load_examples(f"{explicit},{hh}", "rm")
    assert fmt == "explicit-preference+implicit-preference"
    assert [ex.chosen_messages[-1]["content"] for ex in examples] == ["Hello.", "An apple."]
    with pytest.raises(UserError, match="empty dataset name"):
        load_examples(f"{explicit},", "rm")
