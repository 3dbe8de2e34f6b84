"""Small synthetic spam/ham data, a tiny base model and a finetune subprocess to kill, shared by the classifier tests.

Two word lists that a tiny model separates in a few steps; texts of 3-12 words drawn with a seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import torch
from rich.console import Console

from llmstages.checkpoint import save_checkpoint
from llmstages.model import GPT, GPTConfig
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, train_bpe

HAM = "see you at home tonight ok thanks mum love dinner later call me when you are free sorry".split()
SPAM = "win free prize cash claim now urgent txt call 0800 offer winner award guaranteed reply stop".split()


def message(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))


def labeled_rows(n: int, seed: int = 0, spam_every: int = 4) -> list[tuple[str, str]]:
    """(label, text) rows: every `spam_every`-th is spam."""
    rng = random.Random(seed)
    return [("spam", message(rng, SPAM)) if i % spam_every == 0 else ("ham", message(rng, HAM)) for i in range(n)]


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def spam_tokenizer() -> Tokenizer:
    """A 300-token BPE trained on both word lists."""
    rng = random.Random(1)
    return train_bpe([message(rng, HAM + SPAM) for _ in range(300)], 300)


def save_base(store_dir: Path, tokenizer: Tokenizer, run: str = "base") -> str:
    """A tiny random language model (2 x 32, block 32) committed as `run` in the store; returns its name."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(Store(store_dir), run, 1, model, tokenizer, {"task": "pretrain"})
    return run


def finetune_cli(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmstages", "finetune", str(recipe), *extra]


def env_for(store: Path) -> dict:
    return dict(os.environ, LLMSTAGES_STORE=str(store), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def kill_once_written(command: list[str], store: Path, path: Path, wait_s: float = 300) -> None:
    """Run `command` against `store` and SIGKILL it as soon as `path` exists (or it ended, or wait_s passed)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for(store))
    deadline = time.monotonic() + wait_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
