"""The Typer app every `llmstages` command is registered on, the two consoles, and the store option.

cli.py imports the command modules (cli_browse, cli_train, cli_generate, cli_export), which register
their commands here, and runs the app. stdout gets results, stderr progress and messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from llmstages.store import Store


def _plain_metavars(params: list) -> list:
    """Help without type placeholders that say nothing: a flag (`--json`) takes no value, so no `<bool>`;
    an argument is shown by its name in capitals (MODEL), as the docstrings and the README write it."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    return params


class PlainHelpCommand(typer.core.TyperCommand):
    """A command whose help shows flags and arguments without empty type placeholders (every command: cli.py)."""

    def get_params(self, ctx):  # the parameters as help and usage show them
        return _plain_metavars(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    """The same for the top-level command group."""

    def get_params(self, ctx):
        return _plain_metavars(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="llmstages",
    help="Pretrain and fine-tune GPT-style language models: prepare -> pretrain -> finetune -> generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

STORE_HELP = "Store root (default: $LLMSTAGES_STORE or ./store)."


@app.callback()
def _root(store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP, envvar="LLMSTAGES_STORE")) -> None:
    """Pretrain and fine-tune GPT-style language models.

    Examples:\n
      llmstages prepare quickstart\n
      llmstages pretrain quickstart train.max_steps=200\n
      llmstages finetune --task spam\n
      llmstages generate quickstart "It was a dark and stormy night"
    """
    if store is not None:
        os.environ["LLMSTAGES_STORE"] = str(store)


def open_store() -> "Store":
    """The store at --store, $LLMSTAGES_STORE or ./store."""
    from llmstages.store import Store
    return Store()

