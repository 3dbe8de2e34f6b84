"""The `llmstages` command line: parse arguments, load the recipe, call a stage, print the result.

No training logic lives here. The commands are in cli_browse, cli_train, cli_generate and cli_export
(imported here in the order `--help` lists them), the app and its consoles in cli_app. User errors
(`UserError`) print their message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

import llmstages.cli_browse  # noqa: F401  (each import registers its commands on the app)
import llmstages.cli_train  # noqa: F401
import llmstages.cli_generate  # noqa: F401
import llmstages.cli_export  # noqa: F401
from llmstages.cli_app import PlainHelpCommand, app, console, err_console
from llmstages.errors import StopTraining, UserError

__all__ = ["app", "console", "err_console", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors exit with code 2 and a message, no traceback."""
    from rich.markup import escape

    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as err:
        # soft_wrap: a message holds paths and commands to copy; a pipe or log must get them unbroken.
        err_console.print(f"[bold red]error:[/bold red] {escape(err.message)}", highlight=False, soft_wrap=True)
        if err.hint:
            err_console.print(f"[yellow]fix:[/yellow] {escape(err.hint)}", highlight=False, soft_wrap=True)
        return err.exit_code
    except _OutputClosed:
        return _quiet_stdout()
    except StopTraining as stop:
        return 128 + stop.signum  # 130 after SIGINT, 143 after SIGTERM: a clean stop with a checkpoint
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.Abort:
        return 130
    except Exception as err:
        from llmstages.checkpoint import is_disk_full

        if is_disk_full(err):  # e.g. prepare writing shards: a clear message and its own exit code
            where = f" writing {escape(str(err.filename))}" if getattr(err, "filename", None) else ""
            err_console.print(f"[bold red]error:[/bold red] no space left on the device{where}"
                              " (a prepare goes on from its last finished shard when run again)",
                              highlight=False, soft_wrap=True)
            err_console.print("[yellow]fix:[/yellow] free some space or use another --store, then run the same "
                              "command again", highlight=False, soft_wrap=True)
            return 3
        # Usage errors (bad option values, missing arguments) carry their own message and exit code 2.
        # They are click's exceptions, which newer typer versions vendor, so recognise them by shape.
        if callable(getattr(err, "show", None)) and isinstance(getattr(err, "exit_code", None), int):
            err.show()
            return err.exit_code
        raise
    try:
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe would print a warning
    except BrokenPipeError:
        return _quiet_stdout()
    return code if isinstance(code, int) else 0


def run() -> None:
    """The `llmstages` console script and `python -m llmstages`: `main`, then its exit code (a torchrun
    worker ends without the interpreter's teardown: distributed.exit_process)."""
    from llmstages.distributed import exit_process

    exit_process(main())


class _OutputClosed(Exception):
    """The reader of stdout went away (`llmstages generate ... | head -1`): how pipes end, not an error."""


def _stop_quietly_when_output_closes(callback):
    """Wrap a command so that a BrokenPipeError from its output reaches `main` as `_OutputClosed`.

    Click turns a broken pipe inside a command into exit code 1 on its own; a plain exception class
    passes through it untouched.
    """
    @functools.wraps(callback)
    def command(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except BrokenPipeError:
            raise _OutputClosed() from None
    return command


def _quiet_stdout() -> int:
    """Point stdout at /dev/null so no later flush fails again (Python docs, "Note on SIGPIPE"); exit 0."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


for _info in app.registered_commands:
    _info.callback = _stop_quietly_when_output_closes(_info.callback)
    _info.cls = PlainHelpCommand  # (app.command() records typer.core.TyperCommand itself)


if __name__ == "__main__":
    run()
