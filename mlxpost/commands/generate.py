"""`mlxpost generate` and `mlxpost chat`: try a model (and adapter) by hand.

Both sample with the training sampler (the backend's `sample`: same temperature, top-p and
top-k semantics, same seeding) and encode prompts exactly as the data pipeline does
(`mlxpost.generation.encode_prompt`), so what you see is what training and evaluation see.
Tokens are printed as they are produced: the sampler's optional `on_token` hook hands over
each step's token, and the text shown is the growing decoded completion's new suffix.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

from mlxpost.backend import BACKEND_CHOICES, DTYPES, SamplingConfig
from mlxpost.commands import load_model_and_tokenizer
from mlxpost.errors import UserError, first_line

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character
CHAT_COMMANDS = "/reset clears the history, /quit (or Ctrl-D) exits"


@dataclass
class Session:
    """A loaded model, ready to answer."""

    backend: object
    model: object
    info: object  # TokenizerInfo
    encoder: object  # ChatEncoder of the data pipeline
    label: str  # the model as the user named it (and the adapter)
    limit: int | None  # the model's positions (prompt + completion), None: unbounded


def load_session(model_path: str | None, adapter: str | None, backend_name: str, dtype: str):
    """Model, adapter and tokenizer, loaded as `mlxpost eval` loads them (hub ids too)."""
    from mlxpost.assets import default_model
    from mlxpost.data.tokenize import ChatEncoder
    from mlxpost.hub import locate_model
    from mlxpost.model_dir import max_positions, read_config

    label = model_path or default_model()
    path = locate_model(label, "--model")  # a Hub id: its cached snapshot
    backend, model, info = load_model_and_tokenizer(backend_name, path, adapter, dtype)
    with warnings.catch_warnings():  # the encoder warns about a missing template; we say it
        warnings.simplefilter("ignore", UserWarning)
        encoder = ChatEncoder(info.tokenizer)
    if adapter:
        label = f"{label} + {adapter}"
    return Session(backend, model, info, encoder, label, max_positions(read_config(path)))


def sampling_config(temperature: float, top_p: float, top_k: int, max_tokens: int):
    if temperature < 0:
        raise UserError(f"--temperature must be at least 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {top_p}")
    if top_k < 0:
        raise UserError(f"--top-k must be at least 0 (0: off), got {top_k}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    return SamplingConfig(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )


def chat_prompt_ids(session: Session, messages: list[dict]) -> list[int]:
    """Ids of a conversation ending in the assistant's generation prompt, as training encodes
    prompts; a template that refuses the conversation is the user's model's problem: exit 2."""
    from jinja2.exceptions import TemplateError

    from mlxpost.generation import encode_prompt

    try:
        return encode_prompt(session.info.tokenizer, messages)
    except TemplateError as err:
        raise UserError(
            f"{session.label}: the chat template refuses this conversation ({first_line(err)})"
        ) from None


def raw_prompt_ids(session: Session, text: str) -> list[int]:
    """The text itself as the prompt, with BOS where the tokenizer's own encoding adds one."""
    encoder = session.encoder
    return encoder.with_bos(encoder.ids(text))


def stream_sample(session: Session, prompt: Sequence[int], cfg, seed: int, on_token):
    """The backend's sampler on one prompt, calling on_token with each step's token row.
    A backend whose sampler has no streaming hook samples whole (nothing is streamed)."""
    backend, info = session.backend, session.info
    args = (session.model, [list(prompt)], cfg, info.eos_ids, info.pad_id, seed)
    if backend.name == "mlx":
        from mlxpost.mlx_backend import sampling

        return sampling.sample(*args, on_token=on_token)
    if backend.name == "torch":
        from torch_backend import sampling

        return sampling.sample(*args, backend.device, on_token=on_token)
    return backend.sample(*args)


class TextStream:
    """Shows a completion as it grows: each new token decodes the whole completion so far
    (so characters spanning several tokens come out whole) and writes the new suffix."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.tokens: list[int] = []
        self.shown = ""

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def on_token(self, row) -> None:
        self.tokens.append(int(row[0]))
        text = self.decode(self.tokens)
        # Wait while a character is incomplete, or while decoding rewrote what is shown.
        if not text.endswith(REPLACEMENT) and text.startswith(self.shown):
            self.show(text)

    def show(self, text: str) -> None:
        start = len(self.shown) if text.startswith(self.shown) else len(common(text, self.shown))
        if text[start:]:
            self.write(text[start:])
        self.shown = text


def common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclass
class Reply:
    text: str
    tokens: int  # generated, the stopping EOS included
    finished: bool  # stopped at EOS (False: cut at the token budget)
    seconds: float


def answer(session, prompt, cfg, seed, write: Callable[[str], None] | None) -> Reply:
    """Sample one completion of `prompt`, writing its text as it comes when `write` is given."""
    stream = TextStream(session.info.tokenizer, write or (lambda _: None))
    start = time.perf_counter()
    samples = stream_sample(session, prompt, cfg, seed, stream.on_token if write else None)
    seconds = time.perf_counter() - start
    tokens = samples.completion_ids[0][samples.completion_mask[0] == 1].tolist()
    text = stream.decode(tokens)
    if write:
        stream.show(text)  # what a held-back character or a non-streaming backend left
    return Reply(text, len(tokens), bool(samples.finished[0]), seconds)


def check_room(session: Session, prompt: Sequence[int]) -> None:
    if session.limit is not None and len(prompt) >= session.limit:
        raise UserError(
            f"the prompt is {len(prompt)} tokens and leaves no room: the model holds "
            f"{session.limit} positions"
        )


def stats_line(session: Session, prompt: Sequence[int], reply: Reply, cfg) -> str:
    rate = reply.tokens / reply.seconds if reply.seconds > 0 else float("inf")
    if reply.finished:
        end = "stopped at EOS"
    elif cfg.max_new_tokens <= reply.tokens:
        end = "reached --max-tokens"
    else:
        end = f"reached the model's {session.limit} positions"
    return (
        f"{reply.tokens} tokens in {reply.seconds:.2f} s, {rate:.1f} tokens/s; prompt "
        f"{len(prompt)} tokens; {end} ({session.backend.name})"
    )


def model_options(function):
    """The options generate and chat share: model, backend and sampling."""
    options = [
        click.option(
            "--model",
            "model_path",
            type=click.Path(),
            default=None,
            help="Checkpoint directory or Hugging Face Hub id (org/name); default: the "
            "bundled model.",
        ),
        click.option(
            "--adapter",
            type=click.Path(),
            default=None,
            help="PEFT LoRA adapter directory to apply, e.g. a run's final/.",
        ),
        click.option(
            "--backend",
            "backend_name",
            type=click.Choice(BACKEND_CHOICES),
            default="auto",
            show_default=True,
            help="auto: mlx on Apple Silicon, torch elsewhere.",
        ),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True),
        click.option("--system", default=None, help="A system message first in the conversation."),
        click.option(
            "--temperature",
            type=float,
            default=0.7,
            show_default=True,
            help="Softmax temperature; 0: greedy decoding.",
        ),
        click.option(
            "--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass (1: off)."
        ),
        click.option(
            "--top-k",
            type=int,
            default=0,
            show_default=True,
            help="Sample among the k likeliest tokens (0: off).",
        ),
        click.option(
            "--max-tokens",
            type=int,
            default=256,
            show_default=True,
            help="Tokens generated at most (also cut to the model's positions).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Sampling seed: the same seed gives the same text.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command("generate")
@model_options
@click.option(
    "--prompt",
    required=True,
    help="The user message (or, with --no-chat-template, the raw prompt text); "
    "- reads it from stdin.",
)
@click.option(
    "--chat-template/--no-chat-template",
    default=True,
    help="Render the prompt as a user message through the model's chat template (default), "
    "or give the text to the model as it is.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object instead: {"prompt", "completion", "tokens", "finished"}.',
)
def generate(
    model_path,
    adapter,
    backend_name,
    dtype,
    system,
    temperature,
    top_p,
    top_k,
    max_tokens,
    seed,
    prompt,
    chat_template,
    as_json,
):
    """Complete one prompt, printing the text as it is generated.

    \b
    Sampling is the training sampler's: the same options and seed give the
    same text as `mlxpost eval` and the RL commands would. Generation stops at
    any EOS id of the checkpoint, or after --max-tokens. A stats line (tokens,
    tokens/s) goes to stderr.

    \b
      mlxpost generate --adapter runs/grpo-demo/final --temperature 0 \\
          --prompt "Sam has 29 toy cars. He buys 35 more. How many does he have?"
    """
    cfg = sampling_config(temperature, top_p, top_k, max_tokens)
    if system is not None and not chat_template:
        raise UserError("--system needs the chat template; leave out --no-chat-template")
    if prompt == "-":
        prompt = sys.stdin.read()
    session = load_session(model_path, adapter, backend_name, dtype)
    if not chat_template:
        ids = raw_prompt_ids(session, prompt)
    else:
        if not session.encoder.use_template:
            click.echo(
                f"note: {session.label} has no chat template: the prompt is encoded as "
                "training encodes plain prompts (the text and a newline)",
                err=True,
            )
        messages = [{"role": "system", "content": system}] if system is not None else []
        ids = chat_prompt_ids(session, messages + [{"role": "user", "content": prompt}])
    check_room(session, ids)
    if as_json:
        reply = answer(session, ids, cfg, seed, None)
        record = {
            "prompt": prompt,
            "completion": reply.text,
            "tokens": reply.tokens,
            "finished": reply.finished,
        }
        click.echo(json.dumps(record, ensure_ascii=False))
    else:
        try:
            reply = answer(session, ids, cfg, seed, write_stdout)
        finally:  # also when interrupted: the shell prompt starts on its own line
            write_stdout("\n")
    click.echo(stats_line(session, ids, reply, cfg), err=True)


def read_line(marker: str) -> str:
    """One line from stdin, after the marker on a terminal (none when piped)."""
    if sys.stdin.isatty():
        return input(marker)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def fit_history(session: Session, head: list[dict], history: list[dict], user: str, cfg):
    """Prompt ids of head + history + the user's message, dropping the oldest exchanges
    while the prompt leaves less than min(--max-tokens, a quarter of the positions) to answer.
    None when the message alone does not fit."""
    message = [{"role": "user", "content": user}]
    while True:
        ids = chat_prompt_ids(session, head + history + message)
        if session.limit is None:
            return ids
        room = min(cfg.max_new_tokens, max(1, session.limit // 4))
        if len(ids) + room <= session.limit:
            return ids
        if not history:
            return None
        del history[:2]  # the oldest user message and its answer
        click.echo(
            f"(dropped the oldest exchange: the conversation outgrew the model's "
            f"{session.limit} positions)",
            err=True,
        )


@click.command("chat")
@model_options
def chat(
    model_path,
    adapter,
    backend_name,
    dtype,
    system,
    temperature,
    top_p,
    top_k,
    max_tokens,
    seed,
):
    """Talk with a model in the terminal; the conversation is kept and rendered through
    the model's chat template every turn.

    \b
    /reset   clear the history (the --system message stays)
    /quit    exit (also Ctrl-D; Ctrl-C at the prompt)
    Ctrl-C while an answer is printed stops it; that exchange is not kept.

    \b
      mlxpost chat --adapter runs/grpo-demo/final
    """
    cfg = sampling_config(temperature, top_p, top_k, max_tokens)
    session = load_session(model_path, adapter, backend_name, dtype)
    if not session.encoder.use_template:
        raise UserError(
            f"{session.label}: the tokenizer has no chat template, so there is no conversation "
            "format to render; use `mlxpost generate --no-chat-template --prompt TEXT`"
        )
    head = [{"role": "system", "content": system}] if system is not None else []
    chat_prompt_ids(session, head + [{"role": "user", "content": "Hello"}])  # fail before input
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and recall for input()
        except ImportError:
            pass
    click.echo(
        f"chat with {session.label} ({session.backend.describe()}); {CHAT_COMMANDS}", err=True
    )
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = read_line("> ")
        except (EOFError, KeyboardInterrupt):
            write_stdout("\n" if sys.stdin.isatty() else "")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            click.echo("(history cleared)", err=True)
            continue
        if text.startswith("/") and " " not in text:
            click.echo(f"(unknown command {text}; {CHAT_COMMANDS})", err=True)
            continue
        ids = fit_history(session, head, history, text, cfg)
        if ids is None:
            click.echo(
                f"(that message is too long for the model's {session.limit} positions)", err=True
            )
            continue
        try:
            reply = answer(session, ids, cfg, seed + turn, write_stdout)
        except KeyboardInterrupt:
            write_stdout("\n")
            click.echo("(stopped; this exchange is not kept)", err=True)
            continue
        finally:
            turn += 1
        write_stdout("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
