"""`llmstages export | merge`: a model out to Hugging Face or GGUF, LoRA adapters folded in."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llmstages.cli_app import app, console, open_store
from llmstages.errors import UserError


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
    store = open_store()
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

    path = run_merge(model, open_store(), run=run)
    console.print(f"merged the LoRA adapters of {model} into {path}", highlight=False)
