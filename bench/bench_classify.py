"""Classification speed on real SMS messages: texts/s at batch sizes 1 and 32. Prints one JSON object.

    python bench/bench_classify.py [--size mini] [--texts 512] [--data DIR]   (DIR: see bench/benchdata.py)

A randomly initialised classifier of the given size (speed does not depend on the weights) with a
byte-level BPE trained on the messages themselves; `predict` is the path `llmstages classify` takes
(tokenize, batch by length, pad, forward, softmax). Figures are the median
of --repeats passes over the same texts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from benchdata import add_data_option, need

from llmstages.classification import predict
from llmstages.model import GPT, build_config, num_params
from llmstages.runtime import peak_rss_mb, set_threads
from llmstages.tokenizer import train_bpe


def sms_texts(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1] for line in lines[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="mini")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    add_data_option(parser)
    args = parser.parse_args()
    sms = need(args.data, "sms_spam/SMSSpamCollection.tsv")

    threads = set_threads()
    texts = sms_texts(sms, args.texts)
    tokenizer = train_bpe(texts, args.vocab_size)
    torch.manual_seed(0)
    config = build_config(args.size, vocab_size=tokenizer.vocab_size, num_classes=2, class_names=["ham", "spam"])
    model = GPT(config).eval()
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    result = {"benchmark": "classify", "size": args.size, "params": num_params(model), "texts": len(texts),
              "mean_tokens_per_text": round(tokens / len(texts), 1), "threads": threads,
              "machine": platform.processor() or platform.machine()}
    with torch.inference_mode():
        predict(model, tokenizer, texts[:64], batch_size=32)  # warm-up
        for batch_size in (1, 32):
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                predict(model, tokenizer, texts, batch_size=batch_size)
                seconds.append(time.perf_counter() - start)
            result[f"texts_per_s_batch_{batch_size}"] = round(len(texts) / statistics.median(seconds), 1)
    result["batch_speedup"] = round(result["texts_per_s_batch_32"] / result["texts_per_s_batch_1"], 2)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
