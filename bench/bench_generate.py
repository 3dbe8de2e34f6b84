"""Generation speed with and without the KV cache. Prints one JSON object.

    python bench/bench_generate.py [--size mini] [--new-tokens 200] [--prompt-tokens 32]

A randomly initialised model of the given size; greedy decoding, so both paths produce the same
tokens (checked) and differ only in cost. Figures are tokens/s of new tokens, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from llmstages.model import GPT, build_config, num_params
from llmstages.runtime import peak_rss_mb, set_threads
from llmstages.sampling import generate_tokens


def timed(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = list(generate_tokens(model, prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache))
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="mini")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads = set_threads()
    torch.manual_seed(0)
    config = build_config(args.size, vocab_size=args.vocab_size)
    model = GPT(config).eval()
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,)).tolist()
    new = min(args.new_tokens, config.block_size - args.prompt_tokens)
    result = {"benchmark": "generate", "size": args.size, "params": num_params(model), "prompt_tokens": len(prompt),
              "new_tokens": new, "threads": threads, "machine": platform.processor() or platform.machine()}
    with torch.inference_mode():
        timed(model, prompt, 8, True)  # warm-up
        runs = {flag: [timed(model, prompt, new, flag) for _ in range(args.repeats)] for flag in (True, False)}
    assert runs[True][0][1] == runs[False][0][1], "cache and no-cache greedy outputs differ"
    for flag, name in ((True, "with_cache"), (False, "without_cache")):
        seconds = statistics.median(t for t, _ in runs[flag])
        result[f"tokens_per_s_{name}"] = round(new / seconds, 1)
    result["cache_speedup"] = round(result["tokens_per_s_with_cache"] / result["tokens_per_s_without_cache"], 2)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
