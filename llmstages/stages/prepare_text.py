"""`prepare` for pretraining text: streamed, in bounded memory, resumable. Called by stages/prepare.py.

Read top to bottom:
  1. resume     the hidden working folder `.partial-<dataset>` beside the dataset keeps what a killed
                run finished: tokenizer.json, scan.json (what the first pass found), the shards, and
                progress.json (the reading position and every shard's length at the last finished
                shard). A run with the same fingerprint goes on from there.
  2. scan       first pass over the documents, nothing tokenized: check them (a bad record stops here,
                before anything is written, unless data.skip_bad), count them, draw the tokenizer's
                sample (encode.TokenizerSample), and find the train documents that fill an empty val /
                test (split.SplitScan). Too few documents: a second scan over pseudo-documents. A
                streamed hf: source is only read for the sample, up to STREAM_SCAN x its size.
  3. tokenizer  trained on the sample, or the given one.
  4. write      second pass: each document goes to its split by a seeded hash (split.DocumentSplit),
                is tokenized in parallel batches (encode.encode_pieces) and appended to its split's
                shards; after every finished shard, progress.json says where to go on from.
  5. commit     manifest.json, MANIFEST and one rename (store.commit_dir): nothing half-written is
                ever visible in the store.

Memory holds one batch of text (encode.BATCH_CHARS), the tokenizer sample (data.tokenizer_sample_bytes)
and the largest single document, never the corpus.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmstages.data.encode import TokenizerSample, encode_pieces
from llmstages.data.plan import Plan, manifest_head, split_stats
from llmstages.data.prepared import PreparedDataset, token_dtype
from llmstages.data.readers import BadRecord, BadRecords
from llmstages.data.split import DocumentSplit, Key, SplitScan, needs_pseudo_documents, pseudo_document_chars
from llmstages.data.stream import ROLES, Position, ShardSet, Unit, read_units, write_json
from llmstages.errors import UserError
from llmstages.store import Store, commit_dir, is_committed
from llmstages.tokenizer import Tokenizer

# A streamed source is scanned for the tokenizer sample only, as far as this many times the sample size.
STREAM_SCAN = 2
WORK_FILES = ("progress.json", "scan.json")


def prepare_pretrain(plan: Plan, store: Store, *, console: Console, force: bool) -> PreparedDataset:
    """Prepare `plan`'s pretraining text (streamed, resumable) and commit it; returns the dataset."""
    started = time.perf_counter()
    work = plan.folder.parent / f".partial-{plan.folder.name}"
    with _locked(store.cache_dir() / "locks" / f"{plan.folder.name}.lock"):
        if not force and is_committed(plan.folder):  # another process committed it while we waited
            return PreparedDataset.open(plan.folder)
        if force or not _same_work(work, plan.fingerprint):
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            scan, tokenizer, tok_info = _scan_and_tokenizer(plan, work, console)
            t0 = time.perf_counter()
            splits, bad, stopped = write_shards(plan, work, tokenizer, scan, console)
        except UserError:  # the input is wrong: nothing worth resuming (a kill or a crash keeps the folder)
            shutil.rmtree(work, ignore_errors=True)
            raise
        except KeyboardInterrupt:
            console.print(f"prepare stopped; the same command goes on from the last finished shard ({work})",
                          highlight=False)
            raise
        encode_seconds = time.perf_counter() - t0
        for name in WORK_FILES:
            (work / name).unlink(missing_ok=True)
        manifest = pretrain_manifest(plan, tokenizer, tok_info, bad, splits, scan, stopped,
                                     seconds=time.perf_counter() - started, encode_seconds=encode_seconds)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        commit_dir(work, plan.folder, replace=True)  # an uncommitted folder in the way, or --force
    return PreparedDataset.open(plan.folder)


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One process at a time works on a dataset (a second one waits, then finds it committed or goes on)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(lock, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _same_work(work: Path, fingerprint: str) -> bool:
    try:
        return json.loads((work / "scan.json").read_text(encoding="utf-8"))["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


# ---------------------------------------------------------------------------------------------------
# scan + tokenizer
# ---------------------------------------------------------------------------------------------------
def _scan_and_tokenizer(plan: Plan, work: Path, console: Console) -> tuple[dict, Tokenizer, dict]:
    """The first pass's findings and the tokenizer: from the working folder when a killed run left them."""
    if (work / "scan.json").exists() and (work / "tokenizer.json").exists():
        scan = json.loads((work / "scan.json").read_text(encoding="utf-8"))
        return scan, Tokenizer.from_file(work / "tokenizer.json"), scan["tokenizer_info"]
    data = plan.recipe.data
    train_sample = plan.tokenizer.tokenizer is None
    with _progress(console) as progress:
        scan, sample = scan_documents(plan, train_sample, progress)
    t0 = time.perf_counter()
    if train_sample:
        if not sample.heap:
            raise UserError("no text to train the tokenizer on", hint="check data.source")
        with _progress(console) as progress:
            progress.add_task(f"training tokenizer (vocab {data.vocab_size:,})", total=None, done="", count="")
            tokenizer, tok_info = sample.train(data.vocab_size, lowercase=data.lowercase)
    else:
        tokenizer, tok_info = plan.tokenizer.tokenizer, {"kind": plan.tokenizer.kind, "from": plan.tokenizer.ref}
    tok_info["seconds"] = round(time.perf_counter() - t0, 3)
    tokenizer.save(work / "tokenizer.json")
    scan.update(fingerprint=plan.fingerprint, tokenizer_info=tok_info)
    write_json(work / "scan.json", scan)
    return scan, tokenizer, tok_info


def scan_documents(plan: Plan, train_sample: bool, progress: Progress) -> tuple[dict, TokenizerSample | None]:
    """First pass (see the module docstring): returns scan.json's content and the tokenizer sample."""
    data = plan.recipe.data
    carve = {name: 0.0 if name in plan.files else frac
             for name, frac in (("val", data.val_fraction), ("test", data.test_fraction))}
    bad = BadRecords()
    found = _scan_pass(plan, carve, 0, train_sample, bad, progress)
    complete = not any(f.streamed for files in plan.files.values() for f in files)
    if bad.count and not data.skip_bad:
        raise bad.error()
    if complete and found["documents"]["train"] == 0:
        n_files = sum(len(files) for files in plan.files.values())
        raise UserError(f"no usable documents in {n_files} source file(s)"
                        + (f" (all {bad.count} were bad)" if bad.count else " (empty corpus)"),
                        hint="check data.source and the field names (data.text_field, ...)")
    pseudo = None
    if complete and needs_pseudo_documents(found["documents"]["train"], carve.values()):
        cut = pseudo_document_chars(found["chars"], carve.values())
        documents = found["documents"]["train"]
        found = _scan_pass(plan, carve, cut, train_sample, BadRecords(), progress)
        pseudo = {"documents": documents, "pieces": found["documents"]["train"], "chars": cut,
                  "reason": "too few documents for the val/test fractions: documents were cut at line breaks "
                            "into pseudo-documents (each followed by end-of-text) before splitting"}
    moved = found["split"].moves() if complete else {}
    if "train" in moved.values():  # a tiny corpus that drew no train document: sample again with it in train
        found = _scan_pass(plan, carve, found["cut"], train_sample, BadRecords(), progress, moved)
    sample = found["sample"]
    if sample is not None:
        sample.drop(key for key, name in moved.items() if name != "train")
    scan = {"complete": complete, "carve": carve, "pseudo": pseudo, "moved": [[*key, name] for key, name in moved.items()],
            "text_bytes": found["bytes"] if complete else None, "bad": bad.to_json()}
    return scan, sample


def _scan_pass(plan: Plan, carve: dict[str, float], cut_chars: int, train_sample: bool, bad: BadRecords,
               progress: Progress, moved: dict[Key, str] | None = None) -> dict:
    data = plan.recipe.data
    total = sum(f.bytes for files in plan.files.values() for f in files) or None
    bar = progress.add_task("reading", total=total, done="", count="")
    split = SplitScan(DocumentSplit(carve["val"], carve["test"], data.split_seed, moved=dict(moved or {})))
    sample = TokenizerSample(data.tokenizer_sample_bytes, data.split_seed) if train_sample else None
    documents = dict.fromkeys(ROLES, 0)
    chars = nbytes = shown = 0
    stream_chars = STREAM_SCAN * data.tokenizer_sample_bytes if train_sample else 0
    if train_sample and data.tokenizer_sample_bytes == 0 and any(f.streamed for f in plan.files["train"]):
        raise UserError("data.tokenizer_sample_bytes=0 (train on everything) cannot be used with a streamed source",
                        hint="set data.tokenizer_sample_bytes, e.g. 8000000, or give data.tokenizer")
    for role in ROLES:
        for unit in read_units(plan, role, cut_chars=cut_chars if role == "train" else 0,
                               stream_chars=stream_chars if role == "train" else 0,
                               on_bad=lambda record, streamed: None if streamed else bad.add(record)):
            documents[role] += 1
            nbytes += unit.doc.nbytes
            if nbytes - shown >= 1 << 20:  # the bar moves every MB, not every (short) document
                progress.update(bar, completed=nbytes, count=f"{sum(documents.values()):,} documents")
                shown = nbytes
            if role != "train":
                continue
            chars += len(unit.doc.text)
            if split.add(unit.key) == "train" and sample is not None:
                sample.add(unit.doc.text, unit.key)
    progress.update(bar, completed=total or 0)
    return {"documents": documents, "chars": chars, "bytes": nbytes, "split": split, "sample": sample, "cut": cut_chars}


# ---------------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------------
def write_shards(plan: Plan, work: Path, tokenizer: Tokenizer, scan: dict, console: Console
                 ) -> tuple[dict, BadRecords, bool]:
    """Second pass (see the module docstring): (splits' manifest entries, bad records, stopped at max_tokens)."""
    data = plan.recipe.data
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    bad = BadRecords(**scan["bad"])
    shards = ShardSet(work, token_dtype(tokenizer.vocab_size), data.shard_tokens, data.max_tokens, bad)
    shards.resume()
    if shards.tokens:
        console.print(f"resuming {plan.folder.name}: {shards.n_shards()} shard(s), {shards.tokens:,} tokens already "
                      f"written in {work}", highlight=False)
    split = DocumentSplit(scan["carve"]["val"], scan["carve"]["test"], data.split_seed,
                          moved={tuple(m[:3]): m[3] for m in scan["moved"]})
    cut = scan["pseudo"]["chars"] if scan["pseudo"] else 0

    def streamed_bad(record: BadRecord, streamed: bool) -> None:
        if streamed:  # local files were checked by the scan; a stream is checked as it is read
            bad.add(record)
            if not data.skip_bad:
                raise bad.error()

    start = shards.position
    budget = data.max_tokens or None
    total = budget or scan["text_bytes"]
    with _progress(console) as progress:
        bar = progress.add_task("tokenizing train/val", total=total, done="", count="")
        done_bytes = sum(c["bytes"] for c in shards.counts.values())
        t0, tokens0 = time.perf_counter(), shards.tokens
        for role in ROLES[ROLES.index(start.role):]:
            if role not in plan.files and role != "train":
                continue
            at = start if role == start.role else Position(role)
            units: dict[int, Unit] = {}
            pieces: dict[int, int] = {}

            def feed() -> Iterator[str]:
                """The role's texts from `at` on; units[n] is the n-th text given to the encoder."""
                n = -1
                for unit in read_units(plan, role, cut_chars=cut if role == "train" else 0, start=at,
                                       on_bad=streamed_bad):
                    if n == -1 and at.done:
                        at.done = False
                        continue  # written in full before the kill
                    n += 1
                    units[n], pieces[n] = unit, (at.pieces if n == 0 else 0)
                    yield unit.doc.text

            skip = 0 if at.done else at.pieces
            for batch in encode_pieces(tokenizer, feed(), skip=skip, batch_chars=data.batch_chars):
                parts: dict[str, list[np.ndarray]] = {name: [] for name in ROLES}
                room = budget - shards.tokens if budget else None  # tokens left under data.max_tokens
                for ids, owner, last in zip(batch.ids, batch.owners, batch.last):
                    unit = units[owner]
                    name = role if role != "train" else split(unit.key)
                    for tokens in (ids, eot) if last else (ids,):
                        if room is not None and len(tokens) >= room:  # the budget ends here
                            parts[name].append(tokens[:room])
                            shards.write(parts)
                            return _finish(shards, scan, True)
                        parts[name].append(tokens)
                        room = None if room is None else room - len(tokens)
                    pieces[owner] += 1
                    if last:
                        shards.counts[name]["documents"] += 1
                        shards.counts[name]["bytes"] += unit.doc.nbytes
                        done_bytes += unit.doc.nbytes
                        del units[owner], pieces[owner]
                    # where to go on from, once this batch is written
                    position = Position(role, unit.file, unit.key[1], unit.key[2], pieces.get(owner, 0), last)
                shards.write(parts)
                shards.save_if_shard_done(position)
                rate = (shards.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                progress.update(bar, completed=shards.tokens if budget else done_bytes,
                                done=_sizes(shards.tokens, budget) if budget else _sizes(done_bytes, total, "bytes"),
                                count=f"{shards.tokens:,} tokens, {rate:,.0f} tokens/s")
    return _finish(shards, scan, False)


def _finish(shards: ShardSet, scan: dict, stopped: bool) -> tuple[dict, BadRecords, bool]:
    info = shards.close()
    carved = [name for name, frac in scan["carve"].items() if frac > 0]
    for name in ("train", *carved):
        if name not in info:
            why = "data.max_tokens was reached first" if stopped else "no document was drawn for it"
            raise UserError(f"the {name} split is empty ({why})",
                            hint="raise data.max_tokens or data.val_fraction, or give data.val_source")
    return info, shards.bad, stopped


def _sizes(done: float, total: float | None, unit: str = "tokens") -> str:
    def short(n: float) -> str:
        for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if n >= size:
                return f"{n / size:.1f}{suffix}"
        return f"{n:.0f}"
    return f"{short(done)}/{short(total)} {unit}" if total else f"{short(done)} {unit}"


def _progress(console: Console) -> Progress:
    """A bar over bytes read (or tokens, with data.max_tokens), with tokens written, tokens/s and an ETA."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"),
                    TextColumn("{task.fields[count]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


# ---------------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------------
def pretrain_manifest(plan: Plan, tokenizer: Tokenizer, tok_info: dict, bad: BadRecords, splits: dict, scan: dict,
                      stopped: bool, *, seconds: float, encode_seconds: float) -> dict:
    """manifest.json of a pretraining dataset (the same fields as the labeled datasets' where they apply)."""
    data = plan.recipe.data
    measured = splits.get("val") or splits["train"]
    text_tokens = measured["tokens"] - measured["documents"]  # end-of-text tokens are not text
    return {
        **manifest_head(plan, tokenizer, tok_info, token_dtype(tokenizer.vocab_size)),
        "bad_records": bad.to_json(),
        "split": {"seed": data.split_seed, "method": "seeded hash of (source sha256, position) per document",
                  "carved": {k: v for k, v in scan["carve"].items() if v > 0},
                  "moved_to_fill_empty_splits": len(scan["moved"])},
        "splits": splits,
        "stopped_at_max_tokens": stopped,
        "stats": split_stats(splits, "documents", text_tokens, seconds=seconds, encode_seconds=encode_seconds),
        "pseudo_documents": scan["pseudo"],
    }
