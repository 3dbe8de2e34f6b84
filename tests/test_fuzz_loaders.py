"""Fuzzing every loader a user can point at a file: only clean UserErrors (exit 2), never a traceback.

Recipe YAML, the data readers (txt, jsonl, json, csv, tsv, parquet) with the example converters, a
checkpoint's safetensors weights, model.json and meta.json, an hf: folder, tokenizer.json and a
prepared dataset's manifest.json get random bytes, random structures and mutations of valid files.
Each test is bounded (max_examples, no deadline); the larger ones are marked slow.
"""

import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.config import DataConfig, Recipe, load_recipe
from llmstages.data.examples import convert
from llmstages.data.prepared import PreparedDataset
from llmstages.data.readers import BadRecord, Record, read_records
from llmstages.errors import UserError
from llmstages.interop import export_hf
from llmstages.model import GPT, GPTConfig
from llmstages.recipe_parse import _field_paths
from llmstages.store import Store, write_manifest
from llmstages.tokenizer import Tokenizer, train_bpe

# LLMSTAGES_FUZZ_EXAMPLES=2000 runs a longer hunt; CI keeps the defaults (about 30 s in all).
EXAMPLES = int(os.environ.get("LLMSTAGES_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
SLOW_FUZZ = settings(FUZZ, max_examples=3 * EXAMPLES)
CONFIG = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)


def clean(load, *args, **kwargs):
    """Call a loader: a result or a UserError are both fine; anything else fails the test (with its input)."""
    try:
        return load(*args, **kwargs)
    except UserError as err:
        assert str(err).strip(), "a UserError must say what is wrong"
        return None


# plain data: what JSON and YAML files hold
scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=20)
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def mutate(data: bytes, rnd: random.Random, edits: int) -> bytes:
    """Flip, delete, insert and truncate bytes of a valid file."""
    buf = bytearray(data)
    for _ in range(edits):
        kind, at = rnd.randrange(4), rnd.randrange(max(len(buf), 1))
        if kind == 0 and buf:
            buf[at] ^= 1 << rnd.randrange(8)
        elif kind == 1 and buf:
            del buf[at:at + rnd.randrange(1, 16)]
        elif kind == 2:
            buf[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 8)))
        else:
            del buf[rnd.randrange(len(buf) + 1):]
    return bytes(buf)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog, said the cat " * 40], 300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------
FIELDS = sorted(_field_paths(Recipe))


def recipe_like():
    """Mappings shaped like recipes (known sections and keys, near-miss keys) holding random values."""
    def section(name):
        keys = [p.split(".", 1)[1] for p in FIELDS if p.startswith(name + ".")]
        return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), plain, max_size=5)
    sections = {name: section(name) for name in ("data", "model", "train", "finetune", "generate")}
    top = {name: plain for name in ("run", "task", "init_from", "description")}
    return st.fixed_dictionaries({}, optional={**sections, **top})


@FUZZ
@given(text=st.binary(max_size=400))
def test_recipe_files_of_random_bytes(workdir, text):
    path = workdir / "fuzz-recipe.yaml"
    path.write_bytes(text)
    clean(load_recipe, path)


@FUZZ
@given(raw=recipe_like() | plain,
       overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(FIELDS) | st.text(max_size=8),
                                    st.text(max_size=12)), max_size=3))
def test_recipe_files_of_random_structures(workdir, raw, overrides):
    path = workdir / "fuzz-recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    clean(load_recipe, path, overrides)


# ---------------------------------------------------------------------------------------------------
# data readers and the example converters
# ---------------------------------------------------------------------------------------------------
def read_all(path: Path, fmt: str, cfg: DataConfig) -> None:
    for record in read_records(path, path.name, fmt, cfg):
        assert isinstance(record, (Record, BadRecord))
        if isinstance(record, Record):
            for task in ("pretrain", "classify", "instruct"):
                convert(task, record, cfg, "alpaca")


@FUZZ
@given(fmt=st.sampled_from(["txt", "jsonl", "json", "csv", "tsv"]), data=st.binary(max_size=400),
       columns=st.sampled_from([[], ["label", "text"]]))
def test_data_files_of_random_bytes(workdir, fmt, data, columns):
    path = workdir / f"fuzz.{fmt}"
    path.write_bytes(data)
    clean(read_all, path, fmt, DataConfig(format=fmt, columns=columns, delimiter="<|endoftext|>"))


record_values = st.dictionaries(st.sampled_from(["text", "label", "instruction", "input", "output", "messages"])
                                | st.text(max_size=6), plain, max_size=5)


@FUZZ
@given(fmt=st.sampled_from(["jsonl", "json"]), records=st.lists(record_values | plain, max_size=5))
def test_json_data_of_random_records(workdir, fmt, records):
    path = workdir / f"fuzz.{fmt}"
    text = "\n".join(json.dumps(r) for r in records) if fmt == "jsonl" else json.dumps(records)
    path.write_text(text)
    clean(read_all, path, fmt, DataConfig(format=fmt))


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=12), max_size=4), max_size=6), sep=st.sampled_from([",", "\t"]))
def test_csv_data_of_random_cells(workdir, rows, sep):
    fmt = "csv" if sep == "," else "tsv"
    path = workdir / f"fuzz-cells.{fmt}"
    path.write_text("\n".join(sep.join(row) for row in [["label", "text"], *rows]))
    clean(read_all, path, fmt, DataConfig(format=fmt))


@pytest.fixture(scope="module")
def parquet_bytes():
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["free prize now", "see you at 6"], "label": ["spam", "ham"]}), buf)
    return buf.getvalue()


@FUZZ
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 6), random_bytes=st.booleans())
def test_parquet_files_mutated(workdir, parquet_bytes, seed, edits, random_bytes):
    rnd = random.Random(seed)
    data = bytes(rnd.randrange(256) for _ in range(200)) if random_bytes else mutate(parquet_bytes, rnd, edits)
    path = workdir / "fuzz.parquet"
    path.write_bytes(data)
    clean(read_all, path, "parquet", DataConfig(format="parquet"))


# ---------------------------------------------------------------------------------------------------
# checkpoints: weights, model.json, meta.json
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(workdir, tokenizer):
    """A committed checkpoint to corrupt; returns (store, its folder, the original files' bytes)."""
    torch.manual_seed(0)
    store = Store(workdir / "store")
    folder = save_checkpoint(store, "r", 1, GPT(GPTConfig(**CONFIG)), tokenizer, {"task": "pretrain"})
    return Original(store, folder, {p.name: p.read_bytes() for p in folder.iterdir()})


class Original(tuple):
    """(store, folder, files) with a short repr: hypothesis prints the fixtures of a failing example."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return f"<checkpoint {self[1]}>"


def corrupt_checkpoint(checkpoint, name: str, data: bytes) -> None:
    """Restore the checkpoint, replace one file and re-sign MANIFEST (a hostile or hand-made checkpoint)."""
    _, folder, original = checkpoint
    for file_name, content in original.items():
        (folder / file_name).write_bytes(content)
    (folder / name).write_bytes(data)
    (folder / "MANIFEST").unlink()
    write_manifest(folder)


@SLOW_FUZZ
@pytest.mark.slow
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 8))
def test_checkpoint_weights_mutated(checkpoint, seed, edits):
    store, _, original = checkpoint
    corrupt_checkpoint(checkpoint, "model.safetensors", mutate(original["model.safetensors"], random.Random(seed), edits))
    clean(load_checkpoint, "r", store)


@FUZZ
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 4))
def test_checkpoint_weights_header_mutated(checkpoint, seed, edits):
    """Edits inside the safetensors JSON header (names, dtypes, shapes, offsets)."""
    store, _, original = checkpoint
    data = original["model.safetensors"]
    header_len = int.from_bytes(data[:8], "little")
    header = mutate(data[8:8 + header_len], random.Random(seed), edits)
    corrupt_checkpoint(checkpoint, "model.safetensors", len(header).to_bytes(8, "little") + header + data[8 + header_len:])
    clean(load_checkpoint, "r", store)


config_values = st.fixed_dictionaries({}, optional={
    key: st.integers(-3, 70) | plain for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                                  "num_classes", "lora_rank")
} | {key: plain for key in ("dropout", "bias", "class_names", "lora_alpha", "lora_targets", "lora_dropout")})


@FUZZ
@given(changes=config_values | plain)
@example(changes={"lora_rank": 1})  # adapters without a layer to sit on: once a ValueError from add_lora
@example(changes={"lora_rank": 2, "lora_targets": ["wte"]})
def test_model_json_of_random_values(checkpoint, changes):
    store, _, original = checkpoint
    config = json.loads(original["model.json"])
    data = dict(config, **changes) if isinstance(changes, dict) else changes
    corrupt_checkpoint(checkpoint, "model.json", json.dumps(data).encode())
    clean(load_checkpoint, "r", store)


@FUZZ
@given(data=st.binary(max_size=200), name=st.sampled_from(["model.json", "meta.json", "tokenizer.json"]))
def test_checkpoint_json_files_of_random_bytes(checkpoint, data, name):
    store = checkpoint[0]
    corrupt_checkpoint(checkpoint, name, data)
    clean(load_checkpoint, "r", store)


meta_values = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from(["pretrain", "classify", "instruct"]) | plain, "template": plain, "parent": plain,
    "generate": st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_k", "top_p", "stop",
                                                 "repetition_penalty", "min_new_tokens"]), plain),
    "data_settings": st.dictionaries(st.sampled_from(["format", "columns", "text_field", "label_field"]), plain)})


@FUZZ
@given(meta=meta_values | plain)
def test_meta_json_of_random_structure(checkpoint, meta):
    """meta.json is read by load_checkpoint, lineage (show), generate's defaults and evaluate's file settings."""
    from llmstages.checkpoint import lineage
    from llmstages.data.examples import data_settings
    from llmstages.stages.generate import Sampling
    store = checkpoint[0]
    corrupt_checkpoint(checkpoint, "meta.json", json.dumps(meta).encode())
    ckpt = clean(load_checkpoint, "r", store)
    if ckpt is not None:
        lineage(ckpt.path, store)
        clean(Sampling.from_checkpoint, ckpt)  # settings valid one by one may still contradict each other
        data_settings(ckpt.meta)


# ---------------------------------------------------------------------------------------------------
# hf: folders
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(checkpoint, workdir):
    store = checkpoint[0]
    corrupt_checkpoint(checkpoint, "MANIFEST.tmp", b"")  # restores the original files
    (checkpoint[1] / "MANIFEST.tmp").unlink()
    write_manifest(checkpoint[1])
    out = export_hf(load_checkpoint("r", store), workdir / "hf", force=False)
    shutil.copytree(out, workdir / "hf-original")
    return out


@FUZZ
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 6), changes=config_values | plain,
       target=st.sampled_from(["model.safetensors", "config.json"]))
def test_hf_folder_mutated(hf_folder, seed, edits, changes, target):
    folder = hf_folder
    original = {p.name: p.read_bytes() for p in (folder.parent / "hf-original").iterdir()}
    for name, content in original.items():
        (folder / name).write_bytes(content)
    if target == "model.safetensors":
        (folder / target).write_bytes(mutate(original[target], random.Random(seed), edits))
    else:
        config = json.loads(original["config.json"])
        keys = ["n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "layer_norm_epsilon", "id2label"]
        if isinstance(changes, dict):
            changes = {keys[i % len(keys)]: v for i, v in enumerate(changes.values())}
            (folder / target).write_text(json.dumps(dict(config, **changes)))
        else:
            (folder / target).write_text(json.dumps(changes))
    clean(load_checkpoint, f"hf:{folder}")


# ---------------------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------------------
def replace_somewhere(value, new, rnd: random.Random):
    """`value` (parsed JSON) with one randomly chosen subtree replaced by `new`."""
    if isinstance(value, dict) and value and rnd.random() < 0.8:
        key = rnd.choice(list(value))
        return dict(value, **{key: replace_somewhere(value[key], new, rnd)})
    if isinstance(value, list) and value and rnd.random() < 0.8:
        i = rnd.randrange(len(value))
        return value[:i] + [replace_somewhere(value[i], new, rnd)] + value[i + 1:]
    return new


@FUZZ
@given(seed=st.integers(0, 2**32), new=plain, as_bytes=st.booleans(), edits=st.integers(1, 5))
def test_tokenizer_json_mutated(workdir, tokenizer, seed, new, as_bytes, edits):
    rnd = random.Random(seed)
    text = tokenizer.to_str()
    path = workdir / "tokenizer.json"
    if as_bytes:
        path.write_bytes(mutate(text.encode(), rnd, edits))
    else:
        path.write_text(json.dumps(replace_somewhere(json.loads(text), new, rnd)))
    loaded = clean(Tokenizer.from_file, path)
    if loaded is not None:
        loaded.decode(loaded.encode("the quick brown fox"))


# ---------------------------------------------------------------------------------------------------
# a prepared dataset's manifest.json
# ---------------------------------------------------------------------------------------------------
@FUZZ
@given(manifest=st.fixed_dictionaries({"format_version": st.just(1)}, optional={
    "task": st.sampled_from(["pretrain", "classify", "instruct"]) | plain,
    "dtype": st.sampled_from(["uint16", "uint32"]) | plain, "splits": plain,
    "fingerprint": plain, "tokenizer_fingerprint": plain, "eot_id": plain, "labels": plain}) | plain)
def test_dataset_manifest_of_random_structure(workdir, manifest):
    folder = workdir / "dataset"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "train-00000.bin").write_bytes(b"\x01\x00\x02\x00")
    write_manifest(folder)
    data = clean(PreparedDataset.open, folder)
    if data is not None:
        for split in data.splits:
            clean(data.shards if data.task == "pretrain" else data.records, split)
