"""Long texts split into blocks, short examples packed into rows: the data side, the
segment-id attention mask's rules (positions, attention bias, prediction mask) and an SFT run
with --packing. That packed numbers equal unpacked ones in both backends is
parity_tests/test_packing.py's."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mlxpost.data import (
    ChatExample,
    TokenizeConfig,
    TokenizedExample,
    pack_lengths,
    pad_batch,
    pad_packed,
    split_text,
    tokenize_examples,
)
from mlxpost.errors import UserError
from mlxpost.functional import prediction_mask

LONG_TEXT = " ".join(f"Word{i} follows the one before it." for i in range(40))


@pytest.fixture(scope="module")
def tokenizer(tiny_builder):
    return tiny_builder.build_tokenizer()


def text_example(text):
    return ChatExample([], None, text=text)


def chat_example(prompt, answer):
    return ChatExample(
        [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]
    )


# --- splitting long texts -----------------------------------------------------------


def test_long_text_is_split_into_blocks_by_default(tokenizer):
    [whole], _ = tokenize_examples([text_example(LONG_TEXT)], tokenizer)
    limit = 32
    examples = [text_example(LONG_TEXT), chat_example("Hi", "Hello"), text_example("Short.")]
    kept, report = tokenize_examples(examples, tokenizer, TokenizeConfig(max_length=limit))
    blocks = [ex for ex in kept if ex.index == 0]
    assert len(blocks) == math.ceil(len(whole.input_ids) / limit) == report["blocks"]
    assert report["split"] == 1 and report["kept"] == 3 and report["on_too_long"] == "split"
    assert len(kept) == report["kept"] - report["split"] + report["blocks"]
    # Consecutive pieces of the encoded text (EOS at the end, as unsplit), each within the limit.
    assert [t for ex in blocks for t in ex.input_ids] == whole.input_ids
    assert whole.input_ids[-1] == tokenizer.eos_token_id
    assert all(len(ex.input_ids) <= limit for ex in blocks)
    for number, ex in enumerate(blocks):
        assert ex.loss_mask == [0] + [1] * (len(ex.input_ids) - 1)
        assert ex.block == number and ex.text and not ex.truncated


def test_split_keeps_conversations_whole_or_drops_them(tokenizer):
    long_chat = chat_example("Hi", LONG_TEXT)
    kept, report = tokenize_examples(
        [long_chat, chat_example("Hi", "Hello")], tokenizer, TokenizeConfig(max_length=24)
    )
    assert [ex.index for ex in kept] == [1]
    assert report["dropped_too_long"] == 1 and report["split"] == 0
    # drop and truncate treat texts as before.
    for mode, count in (("drop", 0), ("truncate", 1)):
        kept, report = tokenize_examples(
            [text_example(LONG_TEXT)], tokenizer, TokenizeConfig(max_length=24, on_too_long=mode)
        )
        assert len(kept) == count and report["split"] == 0
    assert kept[0].truncated and len(kept[0].input_ids) == 24


def test_a_one_token_tail_block_is_left_out():
    example = TokenizedExample(list(range(9)), [0] + [1] * 8, 0, 5, text=True)
    blocks = split_text(example, 4)
    assert [ex.input_ids for ex in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(ex.index == 5 for ex in blocks)
    assert [ex.input_ids for ex in split_text(example, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_unknown_on_too_long_names_the_choices():
    with pytest.raises(UserError, match="split, drop, truncate"):
        TokenizeConfig(on_too_long="cut")


# --- packing ------------------------------------------------------------------------


def naive_first_fit_decreasing(lengths, capacity):
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if free >= lengths[index]:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return [sorted(row) for row in rows]


def test_pack_lengths_is_first_fit_decreasing():
    assert pack_lengths([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    assert pack_lengths([], 8) == []
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 65, size=int(rng.integers(1, 300))).tolist()
        rows = pack_lengths(lengths, 64)
        assert rows == naive_first_fit_decreasing(lengths, 64)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    with pytest.raises(ValueError, match="more than a row"):
        pack_lengths([3, 9], 8)


def test_pad_packed_marks_segments():
    ids, segments = pad_packed([[[5, 6, 7], [8, 9]], [[4]]], pad_id=0, length=7)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [4, 0, 0, 0, 0, 0, 0]]
    assert segments.tolist() == [[1, 1, 1, 2, 2, 0, 0], [1, 0, 0, 0, 0, 0, 0]]


def test_prediction_mask_skips_each_segments_first_token():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0], [0, 0, 1, 1, 1, 1, 1]])
    assert prediction_mask(segments).tolist() == [
        [0, 1, 1, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
    ]


def test_collate_packed_and_packed_batches():
    from mlxpost.algorithms.supervised import Batches, collate_packed

    examples = [
        TokenizedExample(list(range(10, 10 + n)), [0] * p + [1] * (n - p), p, i)
        for i, (n, p) in enumerate([(6, 2), (3, 0), (9, 4), (4, 1), (2, 0)])
    ]
    batch = collate_packed([[examples[0], examples[1]], [examples[4]]], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0, :10].tolist() == [1] * 6 + [2] * 3 + [0]
    # The second example's mask starts with 1 but its first token has no predecessor there.
    assert batch["loss_mask"][0, :10].tolist() == [0, 0, 1, 1, 1, 1, 0, 1, 1, 0]
    assert batch["loss_mask"].dtype == np.float32

    batches = Batches(examples, batch_size=2, seed=3, pad_id=0, packing=True, max_length=12)
    assert batches.units == len(batches.rows) < len(examples)
    first_epoch = [r for step in range(batches.units // 2) for r in batches.indices(step)]
    assert len(set(first_epoch)) == len(first_epoch)
    batch = batches.batch(0)
    again = Batches(examples, batch_size=2, seed=3, pad_id=0, packing=True, max_length=12)
    assert all(np.array_equal(batch[k], again.batch(0)[k]) for k in batch)
    assert batch["input_ids"].shape[0] == 2


# --- the segment-id mask in the backends ---------------------------------------------


MASKS = [
    [[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]],
    [[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 2, 2, 2, 2, 0, 0], [1, 2, 3, 4, 5, 5, 5, 0]],
]


def expected_positions(mask):
    out = np.zeros_like(mask)
    for r, row in enumerate(mask):
        previous, position = 0, -1
        for t, segment in enumerate(row):
            if segment > 0:
                position = 0 if segment != previous else position + 1
                previous = segment
            out[r, t] = max(position, 0)
    return out


@pytest.mark.parametrize("mask", MASKS, ids=["0/1", "segments"])
def test_positions_restart_per_segment(mask):
    mask = np.array(mask, np.int32)
    expected = expected_positions(mask)
    if mask.max() == 1:  # a 0/1 mask keeps the cumulative count it always had
        assert np.array_equal(expected, np.maximum(np.cumsum(mask, 1) - 1, 0))
    torch = pytest.importorskip("torch")
    from torch_backend.modeling import positions as torch_positions

    assert np.array_equal(torch_positions(torch.as_tensor(mask)).numpy(), expected)
    mx = pytest.importorskip("mlx.core")
    from mlxpost.mlx_backend.modeling import positions as mlx_positions

    assert np.array_equal(np.array(mlx_positions(mx.array(mask))), expected)


def expected_allowed(mask, window):
    """The attention rule in plain loops: causal, key real, same segment (a padding query
    sees every real key before it), within the window."""
    batch, width = mask.shape
    out = np.zeros((batch, 1, width, width), bool)
    for b in range(batch):
        for q in range(width):
            for k in range(q + 1):
                same = mask[b, q] == mask[b, k] or mask[b, q] == 0
                near = window is None or q - k < window
                out[b, 0, q, k] = mask[b, k] > 0 and same and near
    return out


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("mask", MASKS, ids=["0/1", "segments"])
def test_attention_masks_follow_the_segment_rule(mask, window):
    mask = np.array(mask, np.int32)
    expected = expected_allowed(mask, window)
    if mask.max() == 1:  # with a 0/1 mask the rule is the one without segments
        causal = np.tril(np.ones((8, 8), bool))
        if window is not None:
            causal &= np.triu(np.ones((8, 8), bool), -(window - 1))
        assert np.array_equal(expected, causal[None, None] & (mask[:, None, None, :] > 0))
    mx = pytest.importorskip("mlx.core")
    from mlxpost.mlx_backend.models.common import NEG_BIAS, attention_bias

    bias = np.array(attention_bias(mx.array(mask), 0, 8, 3, window))
    assert np.array_equal(bias == 0, expected) and np.all(bias[~expected] == NEG_BIAS)
    # With a cache: the last 3 queries of the same rows see the same keys.
    tail = np.array(attention_bias(mx.array(mask), 5, 3, 3, window))
    assert np.array_equal(tail == 0, expected[:, :, 5:])
    torch = pytest.importorskip("torch")
    from torch_backend.modeling import segment_mask

    built = segment_mask(torch.as_tensor(mask), torch.float32, window).numpy()
    assert np.array_equal(built == 0, expected)
    assert np.all(built[~expected] == np.finfo(np.float32).min)


def test_torch_mask_kinds(tiny_dir):
    """0/1 masks go to transformers as they are; packed rows get one mask, or one per layer
    type where the model takes a dict."""
    torch = pytest.importorskip("torch")
    from torch_backend.modeling import load, model_mask

    mask01, segments = (torch.as_tensor(np.array(m, np.int32)) for m in MASKS)
    kinds = {}
    for arch in ("llama", "mistral", "gemma2", "qwen3"):
        model = load(str(tiny_dir / f"tiny-{arch}"), "float32", torch.device("cpu"))
        assert model_mask(model, mask01) is mask01
        kinds[arch] = model_mask(model, segments)
    assert kinds["llama"].shape == kinds["mistral"].shape == (3, 1, 8, 8)
    # Mistral's window (8 in the tiny model) covers these 8 tokens: the same mask as llama's.
    assert torch.equal(kinds["llama"], kinds["mistral"])
    assert sorted(kinds["gemma2"]) == ["full_attention", "sliding_attention"]
    assert sorted(kinds["qwen3"]) == ["full_attention"]


# --- training -------------------------------------------------------------------------


def test_sft_with_packing_trains_on_fewer_rows(tmp_path, capsys):
    pytest.importorskip("torch")
    from mlxpost.algorithms.sft import SFT, SFTConfig
    from mlxpost.assets import DATA
    from mlxpost.loop import setup, train

    data = tmp_path / "data.jsonl"
    with open(os.path.join(DATA, "instructions", "train.jsonl"), encoding="utf-8") as f:
        rows = [next(f) for _ in range(48)]
    rows.append(json.dumps({"instruction": "Repeat.", "input": "", "output": LONG_TEXT}) + "\n")
    data.write_text("".join(rows), encoding="utf-8")
    cfg = SFTConfig(
        backend="torch",
        data=str(data),
        output=str(tmp_path / "run"),
        steps=3,
        batch_size=2,
        max_length=96,
        packing=True,
        eval_every=0,
        save_every=0,
        eval_limit=4,
        eval_math=0,
        eval_text=0,
    )
    session = setup("sft", cfg)
    algorithm = SFT(session, cfg)
    examples, rows = len(algorithm.train_examples), algorithm.batches.units
    assert rows < examples / 2  # short instructions: several per 96-token row
    batch = algorithm.batches.batch(0)
    assert batch["attention_mask"].max() > 1 and batch["input_ids"].shape[1] <= 96
    train(session, algorithm)
    err = capsys.readouterr().err
    assert f"packing: {examples} examples in {rows} rows" in err
    assert "1 examples longer than 96 tokens dropped" in err  # a long conversation
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        metrics = [row for row in map(json.loads, f) if "loss" in row]
    assert len(metrics) == 3 and all(math.isfinite(row["loss"]) for row in metrics)
    assert all(row["tokens"] > 96 for row in metrics)  # more than one row's worth


def test_sft_splits_long_texts(tmp_path, capsys):
    pytest.importorskip("torch")
    from mlxpost.algorithms.supervised import load_tokenized
    from mlxpost.tokenizer import load_tokenizer

    data = tmp_path / "texts.jsonl"
    data.write_text(
        json.dumps({"text": LONG_TEXT}) + "\n" + json.dumps({"text": "A short one."}) + "\n",
        encoding="utf-8",
    )
    from mlxpost.assets import default_model

    tokenizer = load_tokenizer(default_model()).tokenizer
    messages = []
    examples = load_tokenized(
        str(data), "sft", tokenizer, TokenizeConfig(max_length=32), messages.append
    )
    whole = len(tokenizer(LONG_TEXT)["input_ids"])
    assert len(examples) == 1 + math.ceil((whole + 1) / 32)  # + EOS (no BOS on GPT-2)
    assert any("1 texts longer than 32 tokens split into" in m for m in messages), messages
    ids, mask = pad_batch([ex.input_ids for ex in examples], 0)
    assert ids.shape[1] == 32
