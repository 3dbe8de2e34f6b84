"""`llmstages recipes | runs | show | verify`: what the store and the package hold."""

from __future__ import annotations

from typing import Optional

import typer

from llmstages.cli_app import app, console, open_store


@app.command()
def recipes() -> None:
    """List the built-in recipes with their one-line descriptions.

    Example: llmstages recipes
    """
    from llmstages.stages.browse import print_recipes
    print_recipes(console)


@app.command()
def runs(as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {store, runs}.")) -> None:
    """List the runs in the store: checkpoints, best metric, last logged figures.

    In a pipe the rows are plain tab-separated lines with whole run names.

    Examples:\n
      llmstages --store ./store runs\n
      llmstages runs | cut -f1\n
      llmstages runs --json
    """
    from llmstages.stages.browse import print_runs
    print_runs(console, open_store(), as_json=as_json)


@app.command()
def show(model: str = typer.Argument(..., help="Run name, run@STEP, or checkpoint folder."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show a checkpoint: model config, training data, metrics and lineage (its parent checkpoints).

    Example: llmstages show finetune-spam@best
    """
    from llmstages.stages.browse import print_checkpoint
    print_checkpoint(console, open_store(), model, as_json=as_json)


@app.command()
def verify(run: Optional[str] = typer.Argument(None, help="A run name; default: every run and dataset.")) -> None:
    """Check every checkpoint of a run (or of the whole store, with its datasets): sha256 against MANIFEST,
    weights finite and of the right shapes, train state readable and finite. Exit 2 when any file is bad.

    Example: llmstages verify quickstart
    """
    from llmstages.stages.browse import verify_store
    if not verify_store(console, open_store(), run):
        raise typer.Exit(2)
