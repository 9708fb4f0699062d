"""The `mlxpost` command line.

Every command imports its backend lazily, prints progress on stderr and, with
--json, exactly one JSON object on stdout. Bad input (a missing file, an
unsupported model) ends with exit status 2 and one line naming what is wrong.
"""

from __future__ import annotations

import click

from mlxpost.backend import BackendUnavailable
from mlxpost.commands import fail
from mlxpost.commands.data import data
from mlxpost.commands.evaluate import evaluate
from mlxpost.commands.merge import merge, soup
from mlxpost.commands.parity import parity
from mlxpost.commands.plot import plot
from mlxpost.commands.train import distill, dpo, grpo, ppo, rm, sft
from mlxpost.errors import UserError


class Group(click.Group):
    """Turns input errors raised anywhere below into exit status 2 without a traceback."""

    def invoke(self, ctx):
        from mlxpost.adapters import AdapterError

        try:
            return super().invoke(ctx)
        except (UserError, AdapterError, BackendUnavailable) as err:
            fail(str(err))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxpost")
def main():
    """Post-train causal language models with MLX or PyTorch, with the same numerics.

    \b
    Validate numerics on your checkpoint:  mlxpost parity --model DIR
    Run `mlxpost COMMAND --help` for a command's options.
    """


for command in (sft, distill, grpo, ppo, rm, dpo, parity, evaluate, data, merge, soup, plot):
    main.add_command(command)

if __name__ == "__main__":
    main()
