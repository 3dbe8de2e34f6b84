"""The CLI contract for the foundation commands: help, generate, runs, show, exit codes."""

import json

import pytest
import torch

from llmstages.checkpoint import save_checkpoint
from llmstages.model import GPT, GPTConfig
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer


@pytest.fixture
def gpt2_run(store_dir, gpt2_tokenizer_dir):
    """A tiny random model with GPT-2's tokenizer, committed as run 'tiny' in the test store."""
    tok = Tokenizer.from_file(gpt2_tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(Store(store_dir), "tiny", 3, model, tok, {"task": "pretrain", "metrics": {"val_loss": 10.8}})
    return store_dir


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("recipes", "runs", "show", "generate"):
        assert command in result.stdout


def test_generate_json_is_reproducible_and_greedy_matches_no_cache(cli, gpt2_run):
    a = cli("generate", "tiny", "Hello there", "-n", "12", "--seed", "3", "--json")
    b = cli("generate", "tiny", "Hello there", "-n", "12", "--seed", "3", "--json")
    assert a.returncode == 0, a.stderr
    out = json.loads(a.stdout)
    assert set(out) >= {"prompt", "completion", "tokens", "tokens_per_s"}
    assert out["prompt"] == "Hello there" and 1 <= out["tokens"] <= 12
    assert out == {**json.loads(b.stdout), "tokens_per_s": out["tokens_per_s"], "seconds": out["seconds"]}
    greedy = json.loads(cli("generate", "tiny", "Hello", "-n", "10", "-t", "0", "--json").stdout)
    no_cache = json.loads(cli("generate", "tiny", "Hello", "-n", "10", "-t", "0", "--no-cache", "--json").stdout)
    assert greedy["completion"] == no_cache["completion"]


def test_generate_streams_text(cli, gpt2_run):
    result = cli("generate", "tiny", "Hello", "-n", "5", "-t", "0")
    assert result.returncode == 0
    assert "tokens/s" in result.stderr
    assert result.stdout.strip()


def test_unknown_model_is_exit_2_with_a_hint(cli, gpt2_run):
    result = cli("generate", "nosuchrun", "Hello")
    assert result.returncode == 2
    assert "no run named 'nosuchrun'" in result.stderr
    assert "tiny" in result.stderr  # lists the runs that exist
    assert "Traceback" not in result.stderr


def test_bad_option_is_exit_2(cli, gpt2_run):
    result = cli("generate", "tiny", "Hello", "--temperature", "-1")
    assert result.returncode == 2


def test_runs_and_show(cli, gpt2_run):
    runs = cli("runs")
    assert runs.returncode == 0 and "tiny" in runs.stdout
    show = cli("show", "tiny", "--json")
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["config"]["n_layer"] == 1 and data["lineage"][0]["step"] == 3
