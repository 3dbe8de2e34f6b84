"""The `llmstages` command line: parse arguments, load the recipe, call a stage, print the result.

No training logic lives here. User errors (`UserError`) print their message and exit with code 2,
without a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from llmstages.errors import StopTraining, UserError
from llmstages.jsonio import dumps


def _plain_metavars(params: list) -> list:
    """Help without type placeholders that say nothing: a flag (`--json`) takes no value, so no `<bool>`;
    an argument is shown by its name in capitals (MODEL), as the docstrings and the README write it."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):  # the parameters as help and usage show them
        return _plain_metavars(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
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


def _store():
    from llmstages.store import Store
    return Store()


# ---------------------------------------------------------------------------------------------------
# browse
# ---------------------------------------------------------------------------------------------------
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
    print_runs(console, _store(), as_json=as_json)


@app.command()
def show(model: str = typer.Argument(..., help="Run name, run@STEP, or checkpoint folder."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show a checkpoint: model config, training data, metrics and lineage (its parent checkpoints).

    Example: llmstages show finetune-spam@best
    """
    from llmstages.stages.browse import print_checkpoint
    print_checkpoint(console, _store(), model, as_json=as_json)


@app.command()
def verify(run: Optional[str] = typer.Argument(None, help="A run name; default: every run and dataset.")) -> None:
    """Check every checkpoint of a run (or of the whole store, with its datasets): sha256 against MANIFEST,
    weights finite and of the right shapes, train state readable and finite. Exit 2 when any file is bad.

    Example: llmstages verify quickstart
    """
    from llmstages.stages.browse import verify_store
    if not verify_store(console, _store(), run):
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------
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
    dataset = prepare_data(loaded, _store(), console=err_console, force=force)
    print(dataset.path)


# ---------------------------------------------------------------------------------------------------
# training stages
# ---------------------------------------------------------------------------------------------------
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

    store = _store()
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
    result = run_evaluate(model, data, _store(), limit=limit, console=err_console, template=template,
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
    ckpt = load_checkpoint(model, _store())
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


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------
STOP_HELP = ("End the reply before this string (repeat for several, e.g. --stop '\\n\\n' --stop '###'; \\n and "
             "\\t are read as newline and tab); default: the recipe's generate.stop.")
PENALTY_HELP = "Repetition penalty (CTRL): above 1 makes tokens already in the context less likely; 1 = off."
MIN_NEW_HELP = "Ignore end-of-text and --stop strings until this many tokens are generated."


@app.command()
def generate(
    model: str = typer.Argument(..., help="Run name, run@STEP, checkpoint folder, or hf:DIR_OR_ID."),
    prompt: str = typer.Argument(..., help="Text to continue ('-' reads it from stdin)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1, help="Tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help=STOP_HELP, metavar="TEXT"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help=PENALTY_HELP),
    min_new_tokens: Optional[int] = typer.Option(None, "--min-new-tokens", min=0, help=MIN_NEW_HELP),
    raw: bool = typer.Option(False, "--raw", help="Do not apply an instruction model's prompt template."),
    as_chat: bool = typer.Option(False, "--chat", help="PROMPT is a user message: format it with the model's "
                                 "template (its own chat template for hf: models) and stop at the end of turn."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Generate without the KV cache (slower)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
) -> None:
    """Continue PROMPT with MODEL, streaming tokens as they are produced; stops at end-of-text or a --stop string.

    --json adds stop_reason: stop_string, eos or max_new_tokens.

    Examples:\n
      llmstages generate quickstart "The old man said" --temperature 0.8 --top-k 50 --seed 1\n
      llmstages generate quickstart "ROMEO:" --stop "\\n\\n" --repetition-penalty 1.2 --min-new-tokens 10\n
      llmstages generate instruct "Rewrite in passive voice: The cat ate the fish." -t 0\n
      llmstages generate quickstart "Once upon a time" --json\n
      llmstages generate hf:HuggingFaceTB/SmolLM2-135M-Instruct "What is 2+2?" --chat -t 0
    """
    from llmstages.checkpoint import load_checkpoint
    from llmstages.runtime import set_threads
    from llmstages.stages.generate import Sampling, generate_text, stream_to_stdout

    set_threads()
    if prompt == "-":
        prompt = sys.stdin.read()
    ckpt = load_checkpoint(model, _store())
    model_input = None
    template = ckpt.meta.get("template")
    if as_chat and raw:
        raise UserError("--chat and --raw contradict each other", hint="give one of them")
    if as_chat and not template:
        from llmstages.stages.chat import chat_template_name
        template = chat_template_name(ckpt)
        if template is None:
            raise UserError(f"{model}: --chat needs a prompt template, and this model has none (no chat_template "
                            "in its tokenizer_config.json, no template in its checkpoint)",
                            hint="drop --chat to continue the prompt as plain text")
    if template and not raw:
        from llmstages.templates import chat_tokenizer, format_prompt, resolve
        ckpt.tokenizer = chat_tokenizer(template, ckpt.tokenizer)  # hf: stop at the end-of-turn token
        model_input = format_prompt(resolve(template, ckpt.tokenizer), prompt)
    sampling = Sampling.from_checkpoint(ckpt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=_stop_strings(stop),
                                        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
    result = generate_text(ckpt, prompt, model_input=model_input, **sampling.as_kwargs(), use_cache=not no_cache,
                           on_text=None if as_json else stream_to_stdout)
    if as_json:
        print(dumps(result.to_json()))
    else:
        sys.stdout.write("\n")
        err_console.print(f"[dim]{result.tokens} tokens, {result.tokens_per_s:.1f} tokens/s[/dim]")


@app.command()
def chat(
    model: str = typer.Argument(..., help="An instruction model: run name, run@STEP, checkpoint folder, or "
                                "hf:DIR_OR_ID with a chat template."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible replies."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message (chat template only)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help=STOP_HELP, metavar="TEXT"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help=PENALTY_HELP),
    min_new_tokens: Optional[int] = typer.Option(None, "--min-new-tokens", min=0, help=MIN_NEW_HELP),
) -> None:
    """Talk to an instruction model; replies stream as they are generated and end at end-of-text.

    Enter sends a message; end a line with a backslash (\\) to continue it on the next line. /reset clears the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply.

    Prompts use the template stored in the checkpoint: with alpaca every message is a new instruction; with chat the conversation is kept (oldest turns dropped to fit the context) until /reset.

    Replies go to stdout, everything else to stderr, so stdin can be piped.

    Examples:\n
      llmstages chat finetune-instruct\n
      llmstages chat finetune-instruct -t 0 -n 100\n
      printf 'Name three colors.\\n/quit\\n' | llmstages chat finetune-instruct -t 0
    """
    from llmstages.checkpoint import load_checkpoint
    from llmstages.runtime import set_threads
    from llmstages.stages.chat import chat as run_chat
    from llmstages.stages.chat import terminal_read_line
    from llmstages.stages.generate import Sampling, stream_to_stdout

    set_threads()
    ckpt = load_checkpoint(model, _store())
    sampling = Sampling.from_checkpoint(ckpt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=_stop_strings(stop),
                                        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
    run_chat(ckpt, sampling, read_line=terminal_read_line, write=stream_to_stdout, console=err_console, system=system)


def _stop_strings(given: list[str] | None) -> list[str] | None:
    """--stop values with the escapes a shell cannot type easily (\\n, \\t) turned into the characters."""
    if not given:
        return None  # the recipe's generate.stop
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in given]


# ---------------------------------------------------------------------------------------------------
# export, merge
# ---------------------------------------------------------------------------------------------------
@app.command()
def export(
    model: str = typer.Argument(..., help="Run name, run@STEP, checkpoint folder, or hf:DIR_OR_ID."),
    format: str = typer.Option("hf", "--format", help="Output format: hf (a Hugging Face transformers folder) or "
                               "gguf (one file for llama.cpp / Ollama; needs pip install gguf)."),
    out: Path = typer.Option(..., "--out", "-o", help="hf: folder to write (new or empty unless --force); "
                             "gguf: the .gguf file (new unless --force)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder's contents (gguf: the file)."),
) -> None:
    """Export MODEL as a folder that Hugging Face `transformers` loads with from_pretrained, or as a GGUF file.

    hf writes config.json, model.safetensors, tokenizer files and generation_config.json. gguf writes one
    file for llama.cpp and Ollama (GPT-2 blocks, or Llama-architecture ones; weights in f16). LoRA is merged first.

    Examples:\n
      llmstages export quickstart --format hf --out exports/quickstart\n
      llmstages export finetune-spam@best --out exports/spam --force   (GPT2ForSequenceClassification)\n
      llmstages export quickstart --format gguf --out exports/quickstart.gguf   (llama-cli -m exports/quickstart.gguf)
    """
    from llmstages.checkpoint import load_checkpoint
    from llmstages.interop import export_hf

    if format not in ("hf", "gguf"):
        raise UserError(f"--format {format}: unknown export format", hint="use --format hf or --format gguf")
    store = _store()
    ckpt = load_checkpoint(model, store)
    if format == "gguf":
        from llmstages.interop.gguf_export import export_gguf
        path, arch = export_gguf(ckpt, out, force=force, store_root=store.root)
        merged = " (LoRA merged)" if ckpt.model.config.lora_rank > 0 else ""
        console.print(f"exported {ckpt.ref} to {path} as llama.cpp architecture {arch}{merged}", highlight=False)
        console.print(f"[dim]run it with llama-cli -m {path}, or in Ollama with a Modelfile: FROM {path}[/dim]",
                      highlight=False)
        return
    path = export_hf(ckpt, out, force=force, store_root=store.root)
    kind = "GPT2ForSequenceClassification" if ckpt.model.is_classifier else "GPT2LMHeadModel"
    merged = " (LoRA merged)" if ckpt.model.config.lora_rank > 0 else ""
    console.print(f"exported {ckpt.ref} to {path} as {kind}{merged}")
    loader = "AutoModelForSequenceClassification" if ckpt.model.is_classifier else "AutoModelForCausalLM"
    console.print(f"[dim]load it with transformers.{loader}.from_pretrained({str(path)!r})[/dim]", highlight=False)


@app.command()
def merge(
    model: str = typer.Argument(..., help="A LoRA fine-tuned model: run name, run@STEP or checkpoint folder."),
    run: Optional[str] = typer.Option(None, "--run", help="Name of the new run (default: RUN-merged)."),
) -> None:
    """Fold MODEL's LoRA adapters into its weights and store the result as a new run (lineage kept).

    The merged model gives the same outputs without adapters; `export --format hf` merges the same way.

    Examples:\n
      llmstages merge instruct-lora\n
      llmstages merge instruct-lora@best --run instruct-merged
    """
    from llmstages.stages.merge import merge as run_merge

    path = run_merge(model, _store(), run=run)
    console.print(f"merged the LoRA adapters of {model} into {path}", highlight=False)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------
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
    _info.cls = _Command  # (app.command() records typer.core.TyperCommand itself)


if __name__ == "__main__":
    sys.exit(main())
