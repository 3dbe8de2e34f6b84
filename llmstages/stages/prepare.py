"""`llmstages prepare`: raw text or labeled data -> a prepared dataset in the store.

Read top to bottom:
  1. plan       resolve the sources (mirror, cache, download), pick the tokenizer, fingerprint the
                lot; a committed dataset with that fingerprint is reused as it is. Pretraining text
                goes on in stages/prepare_text.py (streamed, bounded memory, resumable); the steps
                below are those of classify / instruct records.
  2. read       every file -> records -> the task's examples; bad records are collected with file:line.
  3. check      any bad record stops here, before anything is written, unless data.skip_bad.
  4. split      deterministic train / val / test (llmstages/data/split.py).
  5. tokenizer  trained on (a sample of) the train split, or the given file / the parent model's.
  6. write      tokens, arrays, tokenizer.json and manifest.json into a hidden folder of the store,
                committed with its MANIFEST by one rename (store.atomic_dir).

The on-disk layout is described in llmstages/data/prepared.py. `pretrain` and `finetune` call
`prepare` themselves when their data is not prepared yet.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmstages.config import Recipe
from llmstages.data import examples as ex
from llmstages.data.encode import encode_many, train_tokenizer
from llmstages.data.plan import Plan, make_plan, manifest_head, split_stats
from llmstages.data.prepared import PreparedDataset, token_dtype, write_labeled_split
from llmstages.data.readers import BadRecord, BadRecords
from llmstages.data.split import split_indices
from llmstages.distributed import is_main_process
from llmstages.errors import UserError
from llmstages.stages.prepare_text import prepare_pretrain
from llmstages.store import Store, atomic_dir, is_committed
from llmstages.tokenizer import Tokenizer


def get_or_prepare(recipe: Recipe, store: Store, console: Console | None = None, *,
                   wait_s: float = 3600) -> PreparedDataset:
    """The recipe's prepared dataset, prepared first when the store does not have it (the sources are
    resolved and hashed once). Under torchrun only rank 0 prepares; the others wait for its commit."""
    console = console or Console(stderr=True)
    plan = make_plan(recipe, store, console=console)
    if is_committed(plan.folder):
        if not plan.folder.name.startswith(f"{plan.name}-") and is_main_process():
            console.print(f"using the prepared dataset {plan.folder} (the same data and settings)", highlight=False)
        return PreparedDataset.open(plan.folder)
    if not is_main_process():
        deadline = time.monotonic() + wait_s
        while not is_committed(plan.folder):
            if time.monotonic() > deadline:
                raise UserError(f"rank {os.environ['RANK']}: gave up waiting for rank 0 to prepare {recipe.data.name}")
            time.sleep(1.0)
        return PreparedDataset.open(plan.folder)
    console.print(f"preparing dataset [cyan]{recipe.data.name}[/cyan] (first use)")
    return prepare(recipe, store, console=console, plan=plan)


def prepare(recipe: Recipe, store: Store, *, console: Console | None = None, force: bool = False,
            plan: Plan | None = None) -> PreparedDataset:
    """Prepare `recipe`'s data (or reuse the prepared dataset with the same fingerprint) and return it.
    `plan`: the recipe's plan when the caller has made it already (the sources are hashed once)."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    plan = plan or make_plan(recipe, store, console=console, reuse=not force)  # --force: under its own name
    if not force and is_committed(plan.folder):
        console.print(f"up to date: {plan.folder} (same input and settings; --force prepares it again)",
                      highlight=False)
        return PreparedDataset.open(plan.folder)
    if recipe.task == "pretrain":  # streamed, bounded memory, resumable: stages/prepare_text.py
        dataset = prepare_pretrain(plan, store, console=console, force=force)
        console.print(summary_table(dataset))
        return dataset
    data, task = recipe.data, recipe.task

    bad = BadRecords()
    with _progress(console) as progress:
        found = read_plan_examples(plan, bad, progress)
    labels = check_labels(found, recipe, bad) if task == "classify" else None
    if bad.count and not data.skip_bad:
        raise bad.error()
    if not found["train"]:
        n_files = sum(len(files) for files in plan.files.values())
        raise UserError(f"no usable {'documents' if task == 'pretrain' else 'records'} in {n_files} source file(s)"
                        + (f" (all {bad.count} were bad)" if bad.count else " (empty corpus)"),
                        hint="check data.source and the field names (data.text_field, ...)")
    if task == "classify" and len(classes := {e.label for e in found["train"]}) < 2:
        raise UserError(f"classification needs at least two classes in the training data; found only {sorted(classes)}",
                        hint="check data.label_field and data.source")
    splits, notes = make_splits(recipe, found, labels)

    t0 = time.perf_counter()
    if plan.tokenizer.tokenizer is not None:
        tokenizer, tok_info = plan.tokenizer.tokenizer, {"kind": plan.tokenizer.kind, "from": plan.tokenizer.ref}
    else:
        with _progress(console) as progress:
            progress.add_task(f"training tokenizer (vocab {data.vocab_size:,})", total=None, count="")
            tokenizer, tok_info = train_tokenizer([_text(e) for e in splits["train"]], data.vocab_size,
                                                  max_bytes=data.tokenizer_sample_bytes, seed=data.split_seed,
                                                  lowercase=data.lowercase)
    tok_info["seconds"] = round(time.perf_counter() - t0, 3)
    dtype = token_dtype(tokenizer.vocab_size)

    t0 = time.perf_counter()
    try:
        # An existing folder here is not committed (checked above), or --force: replace it.
        with atomic_dir(plan.folder, replace=force or plan.folder.exists()) as tmp:
            tokenizer.save(tmp / "tokenizer.json")
            with _progress(console) as progress:
                split_info = write_labeled(tmp, task, splits, tokenizer, dtype, labels, progress)
            encode_seconds = time.perf_counter() - t0
            manifest = build_manifest(plan, tokenizer, tok_info, dtype, bad, split_info, notes, labels,
                                      seconds=time.perf_counter() - started, encode_seconds=encode_seconds)
            (tmp / "manifest.json").write_text(_json(manifest), encoding="utf-8")
    except FileExistsError:
        if not is_committed(plan.folder):  # another process is committing the same dataset right now
            raise
        console.print(f"another process prepared {plan.folder} meanwhile; using it", highlight=False)
    dataset = PreparedDataset.open(plan.folder)
    console.print(summary_table(dataset))
    return dataset


# ---------------------------------------------------------------------------------------------------
# read + check
# ---------------------------------------------------------------------------------------------------
def read_plan_examples(plan: Plan, bad: BadRecords, progress: Progress) -> dict[str, list]:
    """Every role's examples (train from data.source, val / test from their own sources when given)."""
    recipe = plan.recipe
    total = sum(f.bytes for files in plan.files.values() for f in files)
    bar = progress.add_task("reading", total=total, count="")
    unit = "documents" if recipe.task == "pretrain" else "records"
    found: dict[str, list] = {}
    count = 0
    template = recipe.finetune.template
    if recipe.task == "instruct" and template == "hf":  # choose_tokenizer made sure there is one
        from llmstages.templates import resolve
        template = resolve(template, plan.tokenizer.tokenizer)
    for role, files in plan.files.items():
        found[role] = items = []
        for f in files:
            for item in ex.file_examples(f.path, f.display, plan.formats[f.path], recipe.task, recipe.data,
                                         template):
                if isinstance(item, BadRecord):
                    bad.add(item)
                else:
                    items.append(item)
                    count += 1
            progress.update(bar, advance=f.bytes, count=f"{count:,} {unit}")
    return found


def check_labels(found: dict[str, list], recipe: Recipe, bad: BadRecords) -> list[str]:
    """The class names (data.labels, or the sorted labels of the training data); drops and reports
    records whose label is not one of them."""
    declared = bool(recipe.data.labels)
    labels = list(recipe.data.labels) if declared else sorted({e.label for e in found["train"]})
    if len(set(labels)) != len(labels):
        raise UserError(f"data.labels lists a class twice: {labels}")
    for role, items in found.items():
        keep = []
        for item in items:
            problem = ex.label_problem(item, labels, declared)
            if problem is None:
                keep.append(item)
            else:
                bad.add(problem)
        found[role] = keep
    return labels


# ---------------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------------
def make_splits(recipe: Recipe, found: dict[str, list], labels: list[str] | None) -> tuple[dict[str, list], dict]:
    """train / val / test examples: carved out of data.source unless a split has its own source."""
    data = recipe.data
    train = found["train"]
    carve = {name: (0.0 if name in found else frac)
             for name, frac in (("val", data.val_fraction), ("test", data.test_fraction))}
    notes: dict = {"seed": data.split_seed, "carved": {k: v for k, v in carve.items() if v > 0}}
    strata = groups = None
    if recipe.task == "classify":
        strata, groups = [e.label for e in train], [e.text for e in train]
        notes["stratified_by"], notes["grouped_by"] = "label", "text (exact duplicates stay together)"
    elif recipe.task == "instruct":
        groups = [e.prompt for e in train]
        notes["grouped_by"] = "prompt (repeated prompts stay together)"
    index = split_indices(len(train), val_fraction=carve["val"], test_fraction=carve["test"],
                          seed=data.split_seed, strata=strata, groups=groups)
    splits = {"train": [train[i] for i in index["train"]]}
    for name in ("val", "test"):
        if name in found:
            splits[name] = found[name]
        elif name in index:
            splits[name] = [train[i] for i in index[name]]
    return splits, notes


def _text(example) -> str:
    if isinstance(example, ex.InstructExample):
        return example.prompt + example.response
    return example.text


# ---------------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------------
def write_labeled(folder: Path, task: str, splits: dict[str, list], tokenizer: Tokenizer, dtype: str,
                  labels: list[str] | None, progress: Progress) -> dict:
    info = {}
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    for name, items in splits.items():
        nbytes = sum(e.nbytes for e in items)
        bar = progress.add_task(f"tokenizing {name}", total=nbytes, count="")
        if task == "classify":
            arrays = encode_many(tokenizer, [e.text for e in items])
            rows = [{"text": e.text, "label": e.label, "where": e.where} for e in items]
            entry = write_labeled_split(folder, name, arrays, dtype, rows,
                                        labels=[labels.index(e.label) for e in items])
            counts = Counter(e.label for e in items)
            entry["class_counts"] = {label: counts.get(label, 0) for label in labels}
        else:
            prompts = encode_many(tokenizer, [e.prompt for e in items])
            responses = encode_many(tokenizer, [e.response for e in items])
            arrays = [np.concatenate([p, r, eot]) for p, r in zip(prompts, responses)]
            entry = write_labeled_split(folder, name, arrays, dtype, [e.to_json() for e in items],
                                        prompt_lens=[len(p) for p in prompts])
        entry["bytes"] = nbytes
        info[name] = entry
        progress.update(bar, completed=nbytes, count=f"{len(items):,} records")
    return info


def build_manifest(plan: Plan, tokenizer: Tokenizer, tok_info: dict, dtype: str, bad: BadRecords, splits: dict,
                   notes: dict, labels: list[str] | None, *, seconds: float, encode_seconds: float) -> dict:
    recipe = plan.recipe
    count_key = "documents" if recipe.task == "pretrain" else "records"
    measured = splits.get("val") or splits["train"]
    text_tokens = measured["tokens"] - (measured[count_key] if recipe.task != "classify" else 0)
    manifest = {**manifest_head(plan, tokenizer, tok_info, dtype), "bad_records": bad.to_json(), "split": notes,
                "splits": splits, "stats": split_stats(splits, count_key, text_tokens, seconds=seconds,
                                                       encode_seconds=encode_seconds)}
    if recipe.task == "classify":
        manifest["labels"] = labels
    else:
        manifest["template"] = recipe.finetune.template
    return manifest


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------------
# console
# ---------------------------------------------------------------------------------------------------
def _progress(console: Console) -> Progress:
    """One bar per phase over bytes of text, with the documents / records done so far."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)  # logs and pipes get the summary table only


def summary_table(dataset: PreparedDataset) -> Table:
    m = dataset.manifest
    stats, splits = m["stats"], m["splits"]
    unit = "documents" if m["task"] == "pretrain" else "records"
    per_split = lambda key: " / ".join(f"{s[key]:,} {name}" for name, s in splits.items())  # noqa: E731
    table = Table(title=f"prepared {m['name']} ({m['task']})", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(unit, per_split(unit))
    table.add_row("tokens", per_split("tokens"))
    if m["task"] == "classify":
        counts = splits["train"]["class_counts"]
        table.add_row("classes", ", ".join(f"{label} {n:,}" for label, n in counts.items()) + " (train)")
    trained = m["tokenizer"].get("kind") == "trained"
    table.add_row("vocab", f"{m['vocab_size']:,} ({'trained' if trained else m['tokenizer'].get('from')}), {m['dtype']}")
    table.add_row("bytes/token", f"{stats['bytes_per_token']:.3f} ({stats['bytes_per_token_split']})")
    table.add_row("time", f"{stats['seconds']:.1f} s (tokenizer {m['tokenizer']['seconds']:.1f} s, "
                          f"tokenizing + writing {stats['encode_seconds']:.1f} s)")
    table.add_row("tokens/s", f"{stats['tokens_per_s']:,.0f}")
    if (peak := peak_memory_mb()) is not None:
        table.add_row("peak memory", f"{peak:,.0f} MB (resident, this process)")
    if m["bad_records"]["count"]:
        table.add_row("bad records", f"{m['bad_records']['count']:,} skipped (listed in manifest.json)")
    if m.get("pseudo_documents"):
        p = m["pseudo_documents"]
        table.add_row("note", f"{p['documents']} document(s) cut into {p['pieces']} pseudo-documents for the split")
    table.add_row("path", str(dataset.path))
    return table


def peak_memory_mb() -> float | None:
    """Peak resident memory of this process so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
