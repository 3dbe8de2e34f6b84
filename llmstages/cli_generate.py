"""`llmstages generate | chat`: text from a model, one prompt or a conversation."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from llmstages.cli_app import app, err_console, open_store
from llmstages.errors import UserError
from llmstages.jsonio import dumps


STOP_HELP = ("End the reply before this string (repeat for several, e.g. --stop '\\n\\n' --stop '###'; \\n and "
             "\\t are read as newline and tab); default: the recipe's generate.stop.")
PENALTY_HELP = "Repetition penalty (CTRL): above 1 makes tokens already in the context less likely; 1 = off."
MIN_NEW_HELP = "Ignore end-of-text and --stop strings until this many tokens are generated."
DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu or cuda."


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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
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
    from llmstages.runtime import resolve_device, set_threads
    from llmstages.stages.generate import Sampling, generate_text, stream_to_stdout

    set_threads()
    if prompt == "-":
        prompt = sys.stdin.read()
    ckpt = load_checkpoint(model, open_store(), device=resolve_device(device, "--device"))
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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
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
    from llmstages.runtime import resolve_device, set_threads
    from llmstages.stages.chat import chat as run_chat
    from llmstages.stages.chat import terminal_read_line
    from llmstages.stages.generate import Sampling, stream_to_stdout

    set_threads()
    ckpt = load_checkpoint(model, open_store(), device=resolve_device(device, "--device"))
    sampling = Sampling.from_checkpoint(ckpt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=_stop_strings(stop),
                                        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
    run_chat(ckpt, sampling, read_line=terminal_read_line, write=stream_to_stdout, console=err_console, system=system)


def _stop_strings(given: list[str] | None) -> list[str] | None:
    """--stop values with the escapes a shell cannot type easily (\\n, \\t) turned into the characters."""
    if not given:
        return None  # the recipe's generate.stop
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in given]
