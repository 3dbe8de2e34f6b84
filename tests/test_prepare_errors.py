"""Bad input: every bad record as `file:line: reason`, exit 2, nothing written; skip_bad; huge lines; the CLI."""

from __future__ import annotations

import json
import os
import re
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from llmstages.config import build_recipe, load_recipe
from llmstages.data.plan import make_plan
from llmstages.errors import UserError
from llmstages.stages.prepare import prepare
from llmstages.store import Store


def recipe(task: str = "pretrain", **data):
    data.setdefault("vocab_size", 300)
    return build_recipe({"task": task, "data": data}, stem="t")


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def nothing_written(store_dir: Path) -> bool:
    """No dataset, and no temporary folder left behind."""
    data = store_dir / "data"
    return not data.exists() or not any(data.iterdir())


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# Each case: files to write, the recipe, and the `file:line: reason` the error must contain.
CASES = {
    "invalid JSON": (
        {"d.jsonl": jsonl({"text": "fine"}, b'{"text": "no closing brace"')},
        dict(), re.compile(r"d\.jsonl:2: invalid JSON \(.+ at column 28\)")),  # the reason's words are CPython's
    "missing field": (
        {"d.jsonl": jsonl({"body": "text under another name"})},
        dict(), "d.jsonl:1: missing field 'text' (fields: body)"),
    "field not text": (
        {"d.jsonl": jsonl({"text": "ok"}, {"text": ["a", "list"]})},
        dict(), "d.jsonl:2: field 'text' is not text (got list)"),
    "lone surrogate": (
        {"d.jsonl": jsonl({"text": "ok"}, b'{"text": "broken \\ud800 escape"}')},
        dict(), "d.jsonl:2: field 'text' is not valid Unicode (surrogates not allowed at character 8)"),
    "non-UTF-8 text file": (
        {"a.txt": "fine text\n".encode(), "b.txt": "first line\nna\xefve latin-1\n".encode("latin-1")},
        dict(), "b.txt:2: invalid UTF-8 (byte 0xef at column 3); save the file as UTF-8"),
    "empty file": (
        {"a.txt": b"some text\n", "b.txt": b""},
        dict(), "b.txt:1: empty file"),
    "gutenberg file with no body": (
        {"a.txt": b"x\n", "b.txt": b"header\n*** START OF THE BOOK ***\n\n*** END OF THE BOOK ***\n"},
        dict(), "b.txt:2: no text between the Project Gutenberg START and END markers"),
    "empty text": (
        {"d.jsonl": jsonl({"text": "spam text", "label": "spam"}, {"text": "ham text", "label": "ham"},
                          {"text": "   ", "label": "ham"})},
        dict(task="classify"), "d.jsonl:3: field 'text' is empty"),
    "label outside the declared set": (
        {"d.tsv": b"ham\thello\nspam\twin money\neggs\tbacon\n"},
        dict(task="classify", columns=["label", "text"], labels=["ham", "spam"]),
        "d.tsv:3: label 'eggs' is not in data.labels (ham, spam)"),
    "missing label": (
        {"d.jsonl": jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"})},
        dict(task="classify"), "d.jsonl:3: missing field 'label' (fields: text)"),
    "wrong number of columns": (
        {"d.tsv": b"ham\thello\nspam\twin\tmoney\nham\tbye\n"},
        dict(task="classify", columns=["label", "text"]), "d.tsv:2: expected 2 columns (label, text), got 3"),
    "instruction without output": (
        {"i.json": json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}],
                              indent=2).encode()},
        dict(task="instruct"), "i.json:6: missing field 'output' (fields: instruction, input)"),
    "chat not ending with the assistant": (
        {"c.jsonl": jsonl({"instruction": "a", "output": "b"},
                          {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]})},
        dict(task="instruct"), "c.jsonl:2: messages: the last message must have role 'assistant'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_record_is_reported_with_file_and_line_and_nothing_is_written(case, tmp_path, store_dir, monkeypatch):
    files, settings, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        Path(name).write_bytes(content)
    task = settings.pop("task", "pretrain")
    r = recipe(task, source=sorted(files), val_fraction=0, **settings)
    with pytest.raises(UserError) as err:
        prepare(r, Store(store_dir), console=quiet())
    assert err.value.exit_code == 2
    found = expected.search(err.value.message) if isinstance(expected, re.Pattern) else expected in err.value.message
    assert found, err.value.message
    assert err.value.message.startswith("1 bad record in the data (nothing was written):")
    assert "data.skip_bad=true" in err.value.hint
    assert nothing_written(store_dir)


def test_first_20_bad_records_and_a_count(tmp_path, store_dir):
    lines = [b"{bad json" if i % 2 else json.dumps({"text": f"doc {i}"}).encode() for i in range(50)]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(UserError) as err:
        prepare(recipe(source=[str(tmp_path / "d.jsonl")]), Store(store_dir), console=quiet())
    message = err.value.message
    assert message.startswith("25 bad records in the data (nothing was written):")
    assert message.count("invalid JSON") == 20 and message.rstrip().endswith("... and 5 more")
    assert f"{tmp_path / 'd.jsonl'}:2: invalid JSON" in message and f"{tmp_path / 'd.jsonl'}:40:" in message
    assert nothing_written(store_dir)


def test_skip_bad_writes_the_good_records_and_lists_the_bad_ones(tmp_path, store_dir):
    rows = []
    for i in range(60):
        rows.append(b"{bad" if i % 3 == 0 else json.dumps({"text": f"message {i}", "label": "ab"[i % 2]}).encode())
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    r = recipe("classify", source=[str(tmp_path / "d.jsonl")], skip_bad=True, val_fraction=0.1)
    ds = prepare(r, Store(store_dir), console=quiet())
    bad = ds.manifest["bad_records"]
    assert bad["count"] == 20 and len(bad["examples"]) == 20
    where = re.escape(str(tmp_path / "d.jsonl"))
    assert re.fullmatch(rf"{where}:1: invalid JSON \(.+ at column 2\)", bad["examples"][0])
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in bad["examples"]] == [str(i + 1) for i in range(0, 60, 3)]
    assert sum(s["records"] for s in ds.manifest["splits"].values()) == 40


def test_an_empty_corpus_is_a_clear_error(tmp_path, store_dir):
    (tmp_path / "a.txt").write_text("\n\n")
    (tmp_path / "b.jsonl").write_text("")
    r = recipe(source=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], skip_bad=True)
    with pytest.raises(UserError, match=r"no usable documents in 2 source file\(s\) \(all 2 were bad\)"):
        prepare(r, Store(store_dir), console=quiet())
    assert nothing_written(store_dir)


def test_too_few_records_to_split(tmp_path, store_dir):
    (tmp_path / "d.jsonl").write_bytes(jsonl({"instruction": "only one", "output": "x"}))
    with pytest.raises(UserError, match="too few records to split"):
        prepare(recipe("instruct", source=[str(tmp_path / "d.jsonl")], val_fraction=0.1), Store(store_dir),
                console=quiet())
    assert nothing_written(store_dir)


def test_plain_text_cannot_be_classified(tmp_path, store_dir):
    (tmp_path / "a.txt").write_text("words")
    with pytest.raises(UserError, match="classify data needs named fields"):
        prepare(recipe("classify", source=[str(tmp_path / "a.txt")]), Store(store_dir), console=quiet())


def test_a_single_50mb_line(tmp_path, store_dir):
    """One 50 MB line, no line breaks at all: read, cut, tokenized in bounded batches, round trip intact."""
    unit = "internationalization counterrevolutionary incomprehensibilities uncharacteristically "
    text = (unit * (50_000_000 // len(unit) + 1))[:50_000_000].rstrip()
    (tmp_path / "line.txt").write_text(text)
    ds = prepare(recipe(source=[str(tmp_path / "line.txt")], vocab_size=400, tokenizer_sample_bytes=1_000_000,
                        val_fraction=0.02), Store(store_dir), console=quiet())
    m = ds.manifest
    assert m["pseudo_documents"]["documents"] == 1 and m["splits"]["val"]["documents"] > 0
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == len(text)
    flat = np.concatenate(ds.shards("val"))
    pieces = ds.tokenizer.decode(flat.tolist()).split("<|endoftext|>")[:-1]
    assert len(pieces) == m["splits"]["val"]["documents"] and all(p in text for p in pieces)
    assert m["stats"]["bytes_per_token"] > 15  # whole words became tokens: the line was not mangled


def test_a_50mb_csv_field_is_read(tmp_path, store_dir):
    """csv's default field limit is 128 KB: a 50 MB message must still be one (here: bad-label) record."""
    big = "x" * 50_000_000
    (tmp_path / "d.tsv").write_text(f"ham\tshort\nspam\tother\nmaybe\t{big}\n")
    r = recipe("classify", source=[str(tmp_path / "d.tsv")], columns=["label", "text"], labels=["ham", "spam"])
    with pytest.raises(UserError, match=r"d.tsv:3: label 'maybe' is not in data.labels"):
        prepare(r, Store(store_dir), console=quiet())


# --- the four built-in recipes resolve offline through LLMSTAGES_DATA --------------------------------
@pytest.mark.parametrize("name,files,first_mirror", [
    ("quickstart", 48, "gutenberg/pg11_alice_in_wonderland.txt"),
    ("shakespeare", 1, "tinyshakespeare.txt"),
    ("finetune-spam", 1, "sms_spam/SMSSpamCollection.tsv"),
    ("finetune-instruct", 1, "instruction-data.json"),
])
def test_builtin_recipes_resolve_to_the_mirror_without_downloading(name, files, first_mirror, data_file,
                                                                     store_dir, monkeypatch):
    root = data_file("SOURCES.md").parent
    monkeypatch.setenv("LLMSTAGES_DATA", str(root))
    overrides = ["data.tokenizer=gpt2-tokenizer"] if name.startswith("finetune") else []
    r = load_recipe(name, overrides)
    assert r.description and all(s.startswith("https://") for s in r.data.source)
    plan = make_plan(r, Store(store_dir))
    sources = plan.files["train"]
    assert len(sources) == files and all(s.mirror for s in sources)
    assert sources[0].path == root / first_mirror
    assert not (store_dir / "cache").exists()  # nothing downloaded


def test_real_tiny_shakespeare_through_the_recipe(data_file, store_dir, monkeypatch):
    monkeypatch.setenv("LLMSTAGES_DATA", str(data_file("SOURCES.md").parent))
    ds = prepare(load_recipe("shakespeare", ["data.vocab_size=512"]), Store(store_dir), console=quiet())
    m = ds.manifest
    assert m["sources"][0]["mirror"] is True and m["sources"][0]["pinned_sha256"].startswith("86c4e6aa")
    assert m["splits"]["val"]["documents"] > 0 and m["pseudo_documents"]["documents"] == 1
    assert m["stats"]["bytes"] == 1_115_394 - 1  # the file's trailing newline is not part of the document


# --- the command line ------------------------------------------------------------------------------
def test_cli_bad_input_exits_2_with_file_line_and_no_traceback(cli, tmp_path, store_dir):
    (tmp_path / "bad.jsonl").write_bytes(jsonl({"text": "ok"}, b"{oops"))
    (tmp_path / "r.yaml").write_text("task: pretrain\ndata:\n  source: [bad.jsonl]\n  vocab_size: 300\n")
    result = cli("prepare", "r.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl:2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert "skip_bad" in result.stderr and result.stdout == ""
    assert nothing_written(store_dir)


def test_cli_prepares_reuses_and_forces(cli, tmp_path, store_dir):
    (tmp_path / "docs.txt").write_text("".join(f"Document number {i}.\n<|endoftext|>\n" for i in range(30)))
    (tmp_path / "r.yaml").write_text("description: test\ntask: pretrain\ndata:\n  source: [docs.txt]\n"
                                     "  delimiter: <|endoftext|>\n")
    first = cli("prepare", "r.yaml", "data.vocab_size=300", "data.val_fraction=0.1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    assert path.parent == store_dir / "data" and path.name.startswith("r-")
    summary = " ".join(first.stderr.split())
    counts = re.search(r"(\d+) train / (\d+) val", summary)  # the hash split: about 10% val, never none
    assert counts and int(counts[1]) + int(counts[2]) == 30 and int(counts[2]) >= 1
    assert "tokens/s" in summary and "bytes/token" in summary
    again = cli("prepare", "r.yaml", "data.vocab_size=300", "data.val_fraction=0.1", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout and "up to date" in again.stderr
    forced = cli("prepare", "r.yaml", "data.vocab_size=300", "data.val_fraction=0.1", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and forced.stdout == first.stdout and "up to date" not in forced.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["settings"]["vocab_size"] == 300 and os.listdir(store_dir / "data") == [path.name]


def test_cli_unknown_override_and_help(cli, tmp_path):
    result = cli("prepare", "quickstart", "data.vocab_sise=100", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean `data.vocab_size`" in result.stderr
    help_text = cli("prepare", "--help").stdout
    assert "Examples:" in help_text and "llmstages prepare quickstart" in help_text and "--force" in help_text


def test_the_quickstart_recipes_share_one_dataset_and_the_quickstart_is_the_modern_one(data_file, store_dir,
                                                                                        monkeypatch):
    from llmstages.stages.pretrain import model_config

    monkeypatch.setenv("LLMSTAGES_DATA", str(data_file("SOURCES.md").parent))
    old, new, quick = load_recipe("quickstart-gpt2"), load_recipe("quickstart-modern"), load_recipe("quickstart")
    folders = {make_plan(r, Store(store_dir)).folder for r in (old, new, quick)}
    assert len(folders) == 1  # prepared once for all three
    gpt2 = model_config(old.model, 8192)
    assert gpt2.is_gpt2() and gpt2.bias and gpt2.arch == "gpt2"
    for recipe in (new, quick):
        modern = model_config(recipe.model, 8192)
        assert (modern.arch, modern.pos_emb, modern.norm, modern.bias) == ("modern", "rope", "rmsnorm", False)
        assert (recipe.train.optimizer, recipe.train.schedule) == ("muon", "wsd")
    assert (old.train.optimizer, old.train.schedule) == ("adamw", "cosine")
