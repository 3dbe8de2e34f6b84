"""Data: sources -> records -> examples -> splits -> tokens -> a prepared dataset in the store.

    sources.py   local files / folders / globs, http(s) downloads (mirror, cache, sha256), hf: datasets
    readers.py   .txt .jsonl .json .csv .tsv .parquet -> records carrying `file:line`
    examples.py  records -> the task's examples (document / text + label / prompt + response), checked
    split.py     deterministic train / val / test splits (pretraining: a seeded hash per document)
    stream.py    pretraining documents read as a stream with their positions; the resumable shard set
    encode.py    exact parallel tokenization in bounded batches; training the tokenizer on a sample
    plan.py      which files, which tokenizer, and the fingerprint that names the prepared dataset
    prepared.py  the on-disk format: writers, and `PreparedDataset` to read it
    windows.py   pretraining batches: token windows drawn from the shards by index
    batches.py   fine-tuning batches: the epoch sampler, and the collate functions that pad records
    packing.py   packed batches: several examples (or texts to classify) per row, positions and segments per example

The stage that runs them in order is llmstages/stages/prepare.py (`prepare`, `get_or_prepare`).
"""

from llmstages.data.prepared import LabeledSplit, PreparedDataset

__all__ = ["LabeledSplit", "PreparedDataset"]
