"""`mlxpost generate` and `mlxpost chat`: the training sampler's output, streamed; the chat loop
driven through a pseudo-terminal, on both backends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mlxpost.assets import DATA, default_model
from mlxpost.backend import LoraConfig, SamplingConfig, get_backend
from mlxpost.cli import main
from mlxpost.generation import encode_prompt
from mlxpost.tokenizer import load_tokenizer

BACKENDS = ["torch", "mlx"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def math_question(index: int = 0) -> str:
    with open(os.path.join(DATA, "math", "test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][index]["question"]


def needs(backend_name: str) -> None:
    pytest.importorskip("torch" if backend_name == "torch" else "mlx.core")


def cli(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def expected_completion(backend_name, model_dir, prompt_ids, cfg, seed=0, adapter=None):
    """Text, token count and finished flag of the backend's own sample of one prompt."""
    backend = get_backend(backend_name)
    model = backend.load_model(model_dir)
    if adapter:
        backend.load_adapter(model, adapter)
    info = load_tokenizer(model_dir)
    samples = backend.sample(model, [prompt_ids], cfg, info.eos_ids, info.pad_id, seed)
    tokens = samples.completion_ids[0][samples.completion_mask[0] == 1].tolist()
    text = info.tokenizer.decode(tokens, skip_special_tokens=True)
    return text, len(tokens), bool(samples.finished[0])


def chat_ids(model_dir, messages):
    return encode_prompt(load_tokenizer(model_dir).tokenizer, messages)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter of the bundled model with non-zero weights, saved through the backend
    API as training saves it (small, so the model still answers math questions)."""
    needs("torch")
    backend = get_backend("torch")
    model = backend.load_model(default_model())
    backend.attach_lora(model, LoraConfig(rank=4))
    rng = np.random.default_rng(0)
    params = backend.parameters(model, trainable_only=True)
    backend.set_parameters(
        model,
        {n: (rng.normal(0, 0.02, v.shape) if "lora_B" in n else v) for n, v in params.items()},
    )
    path = tmp_path_factory.mktemp("adapter") / "final"
    backend.save_adapter(model, str(path))
    return str(path)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_greedy_generate_is_the_backends_greedy_sample(backend_name, adapter_dir):
    needs(backend_name)
    question = math_question(0)
    args = ["generate", "--backend", backend_name, "--adapter", adapter_dir, "--prompt", question]
    first = cli(*args, "--temperature", "0", "--max-tokens", "24")
    again = cli(*args, "--temperature", "0", "--max-tokens", "24")
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout  # greedy: deterministic
    ids = chat_ids(default_model(), [{"role": "user", "content": question}])
    text, tokens, finished = expected_completion(
        backend_name, default_model(), ids, SamplingConfig(24, temperature=0), adapter=adapter_dir
    )
    assert first.stdout == text + "\n"  # the streamed pieces add up to the completion
    assert any(ch.isdigit() for ch in text)  # the bundled model answers with a number
    stats = first.stderr.strip().splitlines()[-1]
    assert f"{tokens} tokens in" in stats and "tokens/s" in stats and backend_name in stats
    assert ("stopped at EOS" in stats) == finished


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sampled_generate_is_the_backends_seeded_sample(backend_name):
    needs(backend_name)
    question = math_question(1)
    result = cli(
        "generate",
        "--backend",
        backend_name,
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--seed",
        "7",
        "--max-tokens",
        "16",
        "--json",
        "--prompt",
        question,
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    ids = chat_ids(default_model(), [{"role": "user", "content": question}])
    cfg = SamplingConfig(16, temperature=0.9, top_p=0.95, top_k=40)
    text, tokens, finished = expected_completion(backend_name, default_model(), ids, cfg, seed=7)
    assert (record["completion"], record["tokens"], record["finished"]) == (text, tokens, finished)


def test_json_prints_one_object():
    needs("torch")
    question = math_question(2)
    result = cli(
        "generate",
        "--backend",
        "torch",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "--prompt",
        "-",
        input=question,
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"prompt", "completion", "tokens", "finished"}
    assert record["prompt"] == question
    assert isinstance(record["completion"], str) and isinstance(record["finished"], bool)
    assert 1 <= record["tokens"] <= 12
    assert "tokens/s" in result.stderr
    plain = cli(
        "generate",
        "--backend",
        "torch",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--prompt",
        question,
    )
    assert plain.stdout == record["completion"] + "\n"


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_chat_template_prompts_with_the_raw_text(backend_name, tiny_dir):
    needs(backend_name)
    text = "Tom has 3 apples and buys 4 more."
    for model_dir in (default_model(), str(tiny_dir / "tiny-llama")):
        result = cli(
            "generate",
            "--model",
            model_dir,
            "--backend",
            backend_name,
            "--no-chat-template",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--json",
            "--prompt",
            text,
        )
        assert result.exit_code == 0, result.output
        ids = load_tokenizer(model_dir).tokenizer(text)["input_ids"]  # BOS where it adds one
        expected = expected_completion(
            backend_name, model_dir, ids, SamplingConfig(8, temperature=0)
        )
        record = json.loads(result.stdout)
        assert (record["completion"], record["tokens"], record["finished"]) == expected


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_system_message_on_a_tiny_model(backend_name, tiny_dir):
    needs(backend_name)
    model_dir = str(tiny_dir / "tiny-qwen3")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many apples?"},
    ]
    result = cli(
        "generate",
        "--model",
        model_dir,
        "--backend",
        backend_name,
        "--system",
        messages[0]["content"],
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
        "--prompt",
        messages[1]["content"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    expected = expected_completion(
        backend_name, model_dir, chat_ids(model_dir, messages), SamplingConfig(8, temperature=0)
    )
    assert (record["completion"], record["tokens"], record["finished"]) == expected


def test_streamed_pieces_are_whole_characters():
    """Characters that span several tokens are written once complete, never as U+FFFD."""
    from mlxpost.commands.generate import TextStream

    tokenizer = load_tokenizer(default_model()).tokenizer
    text = "Größe: 12 € → 日本語 🙂 done"
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        stream.on_token(np.array([token], np.int32))
    stream.show(stream.decode(stream.tokens))
    assert "".join(pieces) == tokenizer.decode(stream.tokens, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 1


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_bad_options_exit_2(tmp_path):
    needs("torch")
    assert_user_error(cli("generate", "--top-p", "0", "--prompt", "x"), "--top-p")
    assert_user_error(cli("generate", "--max-tokens", "0", "--prompt", "x"), "--max-tokens")
    assert_user_error(
        cli("generate", "--no-chat-template", "--system", "s", "--prompt", "x"), "--system"
    )
    long = cli("generate", "--backend", "torch", "--prompt", "apples " * 400)
    assert_user_error(long, "256 positions")
    # A checkpoint without a chat template: chat refuses and points at generate.
    plain = tmp_path / "plain"
    shutil.copytree(default_model(), plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    assert_user_error(
        cli("chat", "--model", str(plain), "--backend", "torch"),
        "no chat template",
        "generate --no-chat-template",
    )


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(*args, timeout=60):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TERM="dumb")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlxpost.cli", "chat", *args],
        cwd=ROOT,
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(40, 400),  # wide: readline echoes the questions on one line
        # Ctrl-C must reach the child even when the suite runs as a background job, whose
        # processes inherit an ignored SIGINT.
        preexec_fn=default_sigint,
    )
    child.expect_exact("> ")
    return child


@pytest.mark.parametrize("backend_name,leave", [("torch", "/quit"), ("mlx", "Ctrl-D")])
def test_chat_answers_a_math_question_in_a_terminal(backend_name, leave, adapter_dir):
    """`mlxpost chat --adapter RUN/final` answers, keeps going, resets, and exits 0 on /quit
    or at the end of input."""
    needs(backend_name)
    pexpect = pytest.importorskip("pexpect")
    args = ["--backend", backend_name, "--adapter", adapter_dir, "--temperature", "0"]
    child = spawn_chat(*args, "--max-tokens", "32")
    child.sendline(math_question(0))
    child.expect_exact(math_question(0))  # the terminal's echo
    child.expect_exact("> ")
    assert "####" in child.before  # the bundled model's answer format
    assert any(ch.isdigit() for ch in child.before)
    child.sendline(math_question(1))  # a second turn, with the first in the history
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.expect_exact("> ")
    if leave == "/quit":
        child.sendline("/quit")
    else:
        child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_stops_the_answer_then_exits_at_the_prompt(tiny_builder, tmp_path):
    """Ctrl-C while an answer streams returns to the prompt; Ctrl-C at the prompt exits 0."""
    needs("mlx")
    pexpect = pytest.importorskip("pexpect")
    model_dir = tiny_builder.build("llama", str(tmp_path / "long"), max_position_embeddings=8192)
    # Random weights and room for 6000 tokens: the answer streams until interrupted.
    child = spawn_chat("--model", model_dir, "--backend", "mlx", "--max-tokens", "6000")
    child.sendline("hello")
    child.expect_exact("hello")
    child.expect(r"\S")  # the answer is streaming
    child.sendintr()
    child.expect_exact("(stopped; this exchange is not kept)")
    child.expect_exact("> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
