"""The `mlxpost` command line.

Every command imports its backend lazily, prints progress on stderr and, with
--json, exactly one JSON object on stdout. The library raises; this layer alone
maps what it raises to exit statuses: bad input (a missing file, an unsupported
model, an invalid option) 2, non-finite training 3, Ctrl-C 130, each with one
line naming what happened.
"""

from __future__ import annotations

import click

from mlxpost.commands import fail
from mlxpost.commands.data import data
from mlxpost.commands.eval import eval_command
from mlxpost.commands.export import export
from mlxpost.commands.generate import chat, generate
from mlxpost.commands.merge import merge, soup
from mlxpost.commands.parity import parity
from mlxpost.commands.plot import plot
from mlxpost.commands.train import distill, dpo, grpo, ppo, rm, sft
from mlxpost.errors import MlxpostError


class Group(click.Group):
    """Turns the library's errors raised anywhere below into their exit status and one line;
    Ctrl-C outside a training loop ends with 130 instead of click's "Aborted!"."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a bad option value or name: one line, not a usage box
            fail(f"{err.format_message()} (see {command_path(err.ctx)} --help)", err.exit_code)
        except MlxpostError as err:
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)


def command_path(ctx: click.Context | None) -> str:
    """`mlxpost data check` for a context, however the program was started."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["mlxpost", *reversed(names)])


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxpost")
def main():
    """Post-train causal language models with MLX or PyTorch, with the same numerics.

    \b
    Validate numerics on your checkpoint:  mlxpost parity --model DIR
    Run `mlxpost COMMAND --help` for a command's options.
    """


for command in (
    sft,
    distill,
    grpo,
    ppo,
    rm,
    dpo,
    parity,
    eval_command,
    generate,
    chat,
    data,
    merge,
    soup,
    plot,
):
    main.add_command(command)
main.add_command(export)

if __name__ == "__main__":
    main()
