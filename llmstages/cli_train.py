"""`llmstages prepare | pretrain | finetune | evaluate | classify`: data in, models trained and judged."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.table import Table

from llmstages.cli_app import app, console, err_console, open_store
from llmstages.errors import UserError
from llmstages.jsonio import dumps


@app.command()
def prepare(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a built-in recipe (`llmstages recipes`)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides of the recipe (data.vocab_size=4096)."),
    force: bool = typer.Option(False, "--force", help="Prepare again even when a dataset with the same fingerprint exists."),
) -> None:
    """Read, check, split and tokenize a recipe's data into a prepared dataset in the store.

    Same input and settings reuse the prepared dataset; changed input or settings make a new one.
    Bad records are listed as file:line: reason, and nothing is written (exit 2) unless
    data.skip_bad=true. URL sources are looked up in $LLMSTAGES_DATA before any download.
    Prints the dataset folder on stdout; progress and a summary go to stderr.

    Examples:\n
      LLMSTAGES_DATA=../shared/data llmstages prepare quickstart\n
      llmstages prepare shakespeare data.vocab_size=1024 data.val_fraction=0.1\n
      llmstages prepare my-recipe.yaml data.source=notes/ data.skip_bad=true\n
      llmstages prepare finetune-spam data.tokenizer=../shared/data/gpt2-tokenizer
    """
    from llmstages.config import load_recipe
    from llmstages.stages.prepare import prepare as prepare_data

    loaded = load_recipe(recipe, overrides or [])
    dataset = prepare_data(loaded, open_store(), console=err_console, force=force)
    print(dataset.path)


OVERRIDES_HELP = "Recipe overrides as dotted KEY=VALUE, e.g. train.lr=3e-4 model.n_layer=6."


@app.command()
def pretrain(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a built-in recipe."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its latest checkpoint, exactly."),
    allow_change: bool = typer.Option(False, "--allow-change", help="With --resume: accept a changed recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, time and memory estimate; train nothing."),
) -> None:
    """Train a base model by next-token prediction (prepares the data first if needed).

    Examples:\n
      llmstages pretrain quickstart\n
      llmstages pretrain quickstart train.max_steps=200 --dry-run\n
      llmstages pretrain shakespeare model.n_layer=6 train.lr=1e-3\n
      llmstages pretrain quickstart --resume\n
      torchrun --nproc_per_node 4 -m llmstages pretrain gpt2-124m
    """
    from llmstages.config import load_recipe
    from llmstages.runtime import set_threads
    from llmstages.stages.pretrain import pretrain as run_pretrain

    set_threads()
    _train(run_pretrain, "pretrain", load_recipe(recipe, overrides or []), resume, allow_change, dry_run)


@app.command()
def finetune(
    task: Optional[str] = typer.Option(None, "--task", help="spam | instruct: picks the built-in recipe."),
    recipe_and_overrides: Optional[list[str]] = typer.Argument(
        None, metavar="[RECIPE] [KEY=VALUE]...", help="A recipe (optional with --task), then overrides.",
        show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its latest checkpoint, exactly."),
    allow_change: bool = typer.Option(False, "--allow-change", help="With --resume: accept a changed recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, time and memory estimate; train nothing."),
) -> None:
    """Fine-tune a base model on labeled data: classes (spam) or instruction/response pairs.

    Examples:\n
      llmstages finetune --task spam\n
      llmstages finetune --task spam finetune.trainable=lora train.lr=1e-3\n
      llmstages finetune --task spam init_from=hf:./gpt2 run=spam-gpt2\n
      llmstages finetune --task instruct train.epochs=2\n
      llmstages finetune my-labels.yaml --dry-run
    """
    from llmstages.config import load_recipe
    from llmstages.runtime import set_threads
    from llmstages.stages.finetune import check_task, task_recipe
    from llmstages.stages.finetune import finetune as run_finetune

    set_threads()
    args = list(recipe_and_overrides or [])
    recipe_path = args.pop(0) if args and "=" not in args[0] else None
    if recipe_path is None:
        if task is None:
            raise UserError("give --task spam|instruct, or a recipe file",
                            hint="e.g. `llmstages finetune --task spam`")
        recipe_path = str(task_recipe(task))
    loaded = load_recipe(recipe_path, args)
    if task is not None:
        check_task(task, loaded, recipe_path)
    _train(run_finetune, "finetune", loaded, resume, allow_change, dry_run)


def _train(stage_fn, stage: str, recipe, resume: bool, allow_change: bool, dry_run: bool) -> None:
    """Run a training stage (or its --dry-run) and print the summary on the main process."""
    from llmstages.loop import print_summary

    store = open_store()
    if not dry_run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # before rank 0 prepares the data the other ranks wait for: a store they cannot see is said now
        from llmstages.distributed import check_shared_store, init_distributed
        check_shared_store(init_distributed(recipe.train.device)[0], store.root)
    result = stage_fn(recipe, store, resume=resume, allow_change=allow_change, dry_run=dry_run,
                      console=err_console)
    if not dry_run and _is_main_process():
        print_summary(err_console, result, f"{stage} {recipe.run}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Run name, run@STEP, checkpoint folder, or hf:DIR_OR_ID."),
    data: list[str] = typer.Option(..., "--data", "-d", help="Data file(s), folder or glob; repeatable.",
                                   metavar="PATH"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate at most N examples / documents."),
    template: Optional[str] = typer.Option(
        None, "--template", help="alpaca | chat: score a language model on instruction data with this prompt "
                                 "template (instruction models use their own)."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Classifiers: label a text with the positive class (classify.positive, default "
                                  "the last, e.g. spam) when its probability is >= P; 0 = the most likely class. "
                                  "Default: the recipe's classify.threshold.", metavar="P"),
) -> None:
    """Evaluate MODEL on data: loss and bits per byte, classifier accuracy and F1, or instruction scores.

    Text gets loss, perplexity and bits per byte; a classifier gets accuracy, per-class F1 and the confusion matrix; an instruction model gets response loss, exact match and ROUGE-L.

    --threshold 0.8 labels a text spam only at 80% or more. --template alpaca scores a base model on instruction data, to compare it with its fine-tuned child.

    Examples:\n
      llmstages evaluate quickstart --data ../shared/data/the-verdict.txt\n
      llmstages evaluate finetune-spam --data sms.tsv --json\n
      llmstages evaluate finetune-spam --data sms.tsv --threshold 0.8\n
      llmstages evaluate finetune-instruct --data held-out.json --limit 50 --json\n
      llmstages evaluate quickstart --data held-out.json --template alpaca --json
    """
    from llmstages.runtime import set_threads
    from llmstages.stages.evaluate import evaluate as run_evaluate
    from llmstages.templates import TEMPLATES

    if template is not None and template not in TEMPLATES:
        raise UserError(f"--template {template}: unknown template", hint=f"use one of: {', '.join(TEMPLATES)}")
    set_threads()
    result = run_evaluate(model, data, open_store(), limit=limit, console=err_console, template=template,
                          threshold=threshold)
    if as_json:
        print(dumps(result))
    elif "per_class" in result:
        from llmstages.stages.classify import print_metrics
        n = result["examples"]
        print_metrics(console, f"evaluate {model} ({n:,} text{'s' if n != 1 else ''})", result)
    else:
        from rich.markup import escape

        from llmstages.runlog import summary_table
        flat = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        console.print(summary_table(f"evaluate {model}", flat))
        for sample in result.get("samples", []):
            console.print(f"[bold]instruction:[/bold] {escape(sample['instruction'])}"
                          + (f"\n[bold]input:[/bold] {escape(sample['input'])}" if sample.get("input") else "")
                          + f"\n[bold]reference:[/bold] {escape(sample['reference'])}"
                          + f"\n[bold]generated:[/bold] {escape(sample['response'])}\n", highlight=False)


@app.command()
def classify(
    model: str = typer.Argument(..., help="A classifier: run name, run@STEP, checkpoint folder, or hf:DIR_OR_ID."),
    texts: Optional[list[str]] = typer.Argument(None, help="Texts to classify; none or '-' reads one per line "
                                                "from stdin (blank lines skipped).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {model, labels, predictions}."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Texts per forward pass."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Classifiers: label a text with the positive class (classify.positive, default "
                                  "the last, e.g. spam) when its probability is >= P; 0 = the most likely class. "
                                  "Default: the recipe's classify.threshold.", metavar="P"),
) -> None:
    """Print the predicted label and its probability for each text.

    The table (or --json) lists the texts in the order given; --json adds every class's probability. --threshold 0.9 labels a text spam only at 90% or more: fewer ham lost as spam.

    Examples:\n
      llmstages classify finetune-spam "WIN a FREE prize now" "See you at 6?"\n
      cat messages.txt | llmstages classify finetune-spam --json\n
      llmstages classify finetune-spam@best - < messages.txt\n
      llmstages classify finetune-spam --threshold 0.9 "Call me now"
    """
    from rich.markup import escape

    from llmstages.checkpoint import load_checkpoint
    from llmstages.runtime import set_threads
    from llmstages.stages.classify import classify_texts, require_classifier

    set_threads()
    ckpt = load_checkpoint(model, open_store(), ensemble_ok=True)
    require_classifier(ckpt, "classify")
    texts = list(texts or [])
    if texts in ([], ["-"]):
        if sys.stdin.isatty():
            err_console.print("reading texts from stdin, one per line (Ctrl-D to finish)")
        texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise UserError("no texts to classify: give them as arguments or one per line on stdin",
                            hint=f'e.g. llmstages classify {model} "some text"')
    predictions = classify_texts(ckpt, texts, batch_size=batch_size, threshold=threshold)
    if as_json:
        print(dumps({"model": ckpt.ref, "labels": ckpt.model.config.class_names, "predictions": predictions}))
        return
    table = Table(title=f"classify {model}", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("label", no_wrap=True)
    table.add_column("probability", justify="right", no_wrap=True)
    table.add_column("text", overflow="fold")  # long texts wrap; the other columns keep their width
    for i, p in enumerate(predictions, 1):
        table.add_row(str(i), escape(p["label"]), f"{p['probability']:.4f}", escape(p["text"]))
    console.print(table)


def _is_main_process() -> bool:
    from llmstages.distributed import is_main_process
    return is_main_process()
