"""Instruction fine-tuning: next-token loss on the response tokens of prompt + response + <|endoftext|>.

A prepared instruction record is `prompt tokens | response tokens | eot` with its prompt length
(data/prepared.py). Here each record becomes one training row:

    ids      p0 p1 p2 r0 r1 EOT            (L tokens, at most block_size + 1)
    inputs   p0 p1 p2 r0 r1                ids[:-1]
    targets  -- -- r0 r1 EOT               ids[1:], prompt positions IGNORE when mask_prompt

so the model learns to produce the response and to end it. A micro-batch is right-padded to its
longest row (pad targets IGNORE); with `finetune.packing` each row holds several examples instead,
each attending only to itself (data/packing.py). The share of padded positions is reported either
way. Rows longer than the context lose prompt tokens from the left first (the end of the prompt,
with the "### Response:" marker, stays next to the response); a response too long even then keeps
its beginning. A row left with no response target never reaches the loss: it is dropped, with a
warning, before training.

Batches follow the indexed pattern of data/windows.py: example order is a permutation seeded by
(seed, epoch), micro-batch g is a slice of it, so resume is exact and DDP sees the 1-process batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from llmstages.checkpoint import Checkpoint
from llmstages.config import Recipe
from llmstages.data.batches import EpochSampler, Example, collate
from llmstages.data.packing import PackedBatches, epoch_padding
from llmstages.data.prepared import LabeledSplit, PreparedDataset
from llmstages.errors import UserError
from llmstages.loop import TrainTask
from llmstages.model import GPT
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.sampling import generate_tokens
from llmstages.tokenizer import Tokenizer

SAMPLE_TOKENS = 64      # new tokens per sample generation at each eval (kept short: evals stay cheap)
MAX_LISTED = 5          # dropped examples named in the warning


# ---------------------------------------------------------------------------------------------------
# one example: truncation to the context, targets
# ---------------------------------------------------------------------------------------------------
def fit_to_context(tokens: np.ndarray, prompt_len: int, block_size: int) -> tuple[np.ndarray, int]:
    """Cut prompt + response + eot to at most block_size + 1 tokens; returns (ids, kept prompt length).

    The prompt is cut from the left as far as the whole response needs, but keeps at least its last
    min(prompt_len, block_size // 4) tokens (a response needs something to answer); what still does
    not fit is cut from the end of the response (its eot is lost).
    """
    budget = block_size + 1  # inputs and targets are both block_size long
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) <= budget:
        return tokens, prompt_len
    answer = len(tokens) - prompt_len  # response + eot
    floor = min(prompt_len, max(1, block_size // 4))
    keep_prompt = min(prompt_len, max(floor, budget - answer))
    keep_answer = budget - keep_prompt
    return np.concatenate([tokens[prompt_len - keep_prompt:prompt_len],
                           tokens[prompt_len:prompt_len + keep_answer]]), keep_prompt


@dataclass
class FittedSplit:
    """A split's rows after truncation, with what truncation did to them."""

    examples: list[Example]
    truncated: int = 0                  # rows cut to the context
    responses_cut: int = 0              # ... of which lost part of the response
    dropped: list[int] = field(default_factory=list)  # record indices with no response target left


def fit_records(tokens: Sequence[np.ndarray], prompt_lens: Sequence[int], block_size: int,
                mask_prompt: bool = True) -> FittedSplit:
    """Every record as a row fitted to the context; rows without a target in the loss are left out."""
    out = FittedSplit([])
    for i, (record, prompt_len) in enumerate(zip(tokens, prompt_lens)):
        ids, kept = fit_to_context(record, int(prompt_len), block_size)
        example = Example(ids, kept, i)
        if len(ids) < len(record):
            out.truncated += 1
            out.responses_cut += int(len(ids) - kept < len(record) - prompt_len)
        if example.response_targets(mask_prompt) <= 0:
            out.dropped.append(i)
        else:
            out.examples.append(example)
    return out


def fit_split(split: LabeledSplit, block_size: int, mask_prompt: bool = True) -> FittedSplit:
    return fit_records([split.example(i) for i in range(len(split))], split.prompt_lens, block_size, mask_prompt)


def report_fitting(console: Console, name: str, fitted: FittedSplit, block_size: int,
                   where: Sequence[str] | None = None) -> None:
    """One line on truncation, and a warning naming the dropped examples."""
    total = len(fitted.examples) + len(fitted.dropped)
    if fitted.truncated:
        console.print(f"{name}: {fitted.truncated} of {total} examples cut to the context of {block_size} tokens "
                      f"(prompts cut from the left; {fitted.responses_cut} of them lost the end of the response too)",
                      highlight=False)
    if fitted.dropped:
        listed = ", ".join(where[i] if where else f"record {i}" for i in fitted.dropped[:MAX_LISTED])
        more = f" and {len(fitted.dropped) - MAX_LISTED} more" if len(fitted.dropped) > MAX_LISTED else ""
        console.print(f"[yellow]warning:[/yellow] {name}: dropped {len(fitted.dropped)} example"
                      f"{'s' if len(fitted.dropped) > 1 else ''} whose response is fully masked, so "
                      f"nothing of it would reach the loss: {escape(listed)}{more}", highlight=False)


# ---------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------
class EpochBatches:
    """`batches(index)` -> micro-batch `index`: the rows data/batches.py's EpochSampler picks, collated."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, *, mask_prompt: bool, pad_id: int):
        self.sampler = EpochSampler(len(examples), batch_size, seed)
        self.examples, self.mask_prompt, self.pad_id = examples, mask_prompt, pad_id

    def __call__(self, index: int) -> dict:
        picked = [self.examples[i] for i in self.sampler.indices(index)]
        return collate(picked, mask_prompt=self.mask_prompt, pad_id=self.pad_id)


def fixed_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict]:
    """Evaluation batches, response tokens only; rows sorted by length so batches carry little padding."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    return [collate(ordered[i:i + batch_size], mask_prompt=True, pad_id=pad_id)
            for i in range(0, len(ordered), batch_size)]


def report_padding(console: Console, examples: list[Example], batch_size: int, seed: int, block_size: int,
                   packing: bool) -> dict[str, float]:
    """One line on the share of padded positions in an epoch's micro-batches, with and without packing."""
    padding = epoch_padding([len(e.ids) - 1 for e in examples], batch_size, seed, block_size)
    if packing:
        console.print(f"train: {len(examples)} examples packed into {padding['rows']} rows of up to {block_size} "
                      f"tokens: {padding['packed']:.1%} of the positions are padding (one example per row: "
                      f"{padding['padded']:.1%})", highlight=False)
    else:
        console.print(f"train: {padding['padded']:.1%} of the positions are padding (finetune.packing=true: "
                      f"{padding['packed']:.1%})", highlight=False)
    return padding


# ---------------------------------------------------------------------------------------------------
# generations
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_response(model: GPT, tokenizer: Tokenizer, prompt: Sequence[int], max_new_tokens: int) -> tuple[str, bool]:
    """The greedy continuation of `prompt` up to end-of-text: (text, stopped at end-of-text)."""
    produced = []
    for token in generate_tokens(model, list(prompt), max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_id=tokenizer.eot_id):
        if token == tokenizer.eot_id:
            return tokenizer.decode(produced), True
        produced.append(token)
    return tokenizer.decode(produced), False


def sample_generations(model: GPT, tokenizer: Tokenizer, rows: list[dict], prompts: list[np.ndarray],
                       console: Console) -> dict:
    """Greedy responses to fixed validation prompts: printed, and returned for log.jsonl."""
    was_training = model.training
    samples = []
    try:
        for row, prompt in zip(rows, prompts):
            text, ended = greedy_response(model, tokenizer, prompt.tolist(), SAMPLE_TOKENS)
            samples.append({"instruction": row.get("instruction", ""), "input": row.get("input", ""),
                            "response": text, "ended": ended})
    finally:
        model.train(was_training)
    for i, s in enumerate(samples, 1):
        asked = s["instruction"] + (f" [{s['input']}]" if s["input"] else "")
        console.print(f"  [dim]sample {i}[/dim] {escape(asked)}\n  [dim]    ->[/dim] {escape(s['response'])}"
                      + ("" if s["ended"] else " [dim]...[/dim]"), highlight=False)
    return {"samples": samples}


# ---------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------
def _val_split(data: PreparedDataset) -> LabeledSplit:
    if "val" not in data.splits or data.manifest["splits"]["val"]["records"] == 0:
        raise UserError(f"dataset {data.path.name} has no validation examples; instruction fine-tuning reports "
                        "the validation response loss at every eval",
                        hint="set data.val_fraction (e.g. 0.05) or data.val_source")
    return data.records("val")


def instruction_task(base: Checkpoint, data: PreparedDataset, recipe: Recipe, *,
                     console: Console | None = None) -> tuple[GPT, TrainTask]:
    """The base model (its LM head) and the task: response-token loss, validation response loss, samples."""
    model = base.model
    if model.is_classifier:
        raise UserError(f"init_from={recipe.init_from} is a classifier; instruction fine-tuning needs a language model")
    console = console or Console(stderr=True)
    ft, cfg = recipe.finetune, recipe.train
    block, pad = model.config.block_size, base.tokenizer.eot_id

    train_split = data.records("train")
    train = fit_split(train_split, block, ft.mask_prompt)
    dropped_where = [r["where"] for r in train_split.texts()] if train.dropped else None
    report_fitting(console, "train", train, block, dropped_where)
    padding = report_padding(console, train.examples, cfg.micro_batch_size, cfg.seed, block, ft.packing)
    if ft.packing:
        batches = PackedBatches(train.examples, cfg.micro_batch_size, cfg.seed, block_size=block,
                                mask_prompt=ft.mask_prompt, pad_id=pad)
    else:
        batches = EpochBatches(train.examples, cfg.micro_batch_size, cfg.seed, mask_prompt=ft.mask_prompt, pad_id=pad)

    val_split = _val_split(data)
    val = fit_split(val_split, block)  # validation loss is always on the response tokens
    report_fitting(console, "val", val, block)
    val_batches = fixed_batches(val.examples[:cfg.eval_batches * cfg.micro_batch_size], cfg.micro_batch_size, pad)

    on_eval = None
    if ft.eval_samples and val.examples:
        rows = val_split.texts()
        chosen = val.examples[:ft.eval_samples]
        prompts = [e.ids[:e.n_prompt] for e in chosen]
        sample_rows = [rows[e.record] for e in chosen]
        on_eval = lambda m: sample_generations(m, base.tokenizer, sample_rows, prompts, console)  # noqa: E731

    meta = {"template": data.manifest["template"], "mask_prompt": ft.mask_prompt, "packing": ft.packing,
            "padding_share": round(padding["packed" if ft.packing else "padded"], 4)}
    # train.epochs counts sequences: packed, a sequence is a row (epoch 0's count; later epochs differ by a few)
    per_epoch = batches.rows_per_epoch if ft.packing else len(train.examples)
    task = TrainTask(kind="instruct", batch=batches, loss=lm_loss,
                     evaluate=lambda m: lm_metrics(m, val_batches, prefix="val_"),
                     data_fingerprint=data.fingerprint, examples_per_epoch=per_epoch, meta=meta,
                     log_fields={"padding_share": meta["padding_share"]},
                     on_eval=on_eval)
    return model, task


# ---------------------------------------------------------------------------------------------------
# `llmstages evaluate` on an instruction model
# ---------------------------------------------------------------------------------------------------
def evaluate_instructions(ckpt: Checkpoint, paths: list[str], *, limit: int | None = None,
                          console: Console | None = None, template: str | None = None,
                          batch_size: int = 8, samples: int = 3) -> dict:
    """Response-token loss and perplexity, then exact match and ROUGE-L of greedy generations.

    `template` (default: the checkpoint's) lets a base language model be scored the same way, for a
    before/after comparison. Generations stop at end-of-text or after 1.5x the reference's tokens + 16.
    """
    from llmstages.data.encode import encode_many
    from llmstages.data.examples import data_settings, read_examples
    from llmstages.rouge import rouge_l
    from llmstages.templates import TEMPLATES, chat_tokenizer, resolve

    console = console or Console(stderr=True)
    template = template or ckpt.meta.get("template")
    if template not in TEMPLATES:
        raise UserError(f"{ckpt.ref} is not an instruction model (no prompt template in its checkpoint)",
                        hint="pass --template alpaca (or chat, or hf: the model's own chat template) to score "
                             "it on instruction data with that template")
    model, tok = ckpt.model, chat_tokenizer(template, ckpt.tokenizer)  # hf: responses end at the end of turn
    block = model.config.block_size
    examples = read_examples(paths, "instruct", data_settings(ckpt.meta), template=resolve(template, tok),
                             limit=limit)
    prompts = encode_many(tok, [e.prompt for e in examples])
    responses = encode_many(tok, [e.response for e in examples])
    records = [np.concatenate([p, r, [tok.eot_id]]).astype(np.int64) for p, r in zip(prompts, responses)]
    fitted = fit_records(records, [len(p) for p in prompts], block)
    report_fitting(console, "evaluation data", fitted, block, [e.where for e in examples])

    model.eval()
    with torch.inference_mode():
        metrics = lm_metrics(model, fixed_batches(fitted.examples, batch_size, tok.eot_id), prefix="")
    exact, rouge, ended, shown = 0, 0.0, 0, []
    with _progress(console, len(examples)) as step:
        for example, prompt, response in zip(examples, prompts, responses):
            budget = math.ceil(1.5 * len(response)) + 16
            text, stopped = greedy_response(model, tok, prompt.astype(np.int64).tolist(), budget)
            exact += " ".join(text.split()) == " ".join(example.response.split())
            rouge += rouge_l(text, example.response)
            ended += stopped
            if len(shown) < samples:
                shown.append({"instruction": example.instruction, "input": example.input,
                              "reference": example.response, "response": text})
            step()
    n = len(examples)
    return {"loss": metrics["loss"], "perplexity": metrics["ppl"], "exact_match": exact / n, "rouge_l": rouge / n,
            "ended_at_eot": ended / n, "examples": n, "tokens": metrics["tokens"], "truncated": fitted.truncated,
            "template": template, "samples": shown}


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[], None]]:
    """A transient progress bar over the generations on a terminal; silent in logs and pipes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task("generate", total=total)
    with bar:
        yield lambda: bar.advance(task)
