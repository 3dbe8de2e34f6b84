"""The CLI contract for the foundation commands: help, generate, runs, show, exit codes."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from llmstages.checkpoint import save_checkpoint
from llmstages.cli import main as cli_main
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


COMMANDS = ["recipes", "runs", "show", "verify", "prepare", "pretrain", "finetune", "evaluate", "classify", "generate", "chat",
            "export", "merge"]


def test_help_lists_every_command_and_each_has_help_with_examples(cli, capsys, monkeypatch):
    result = cli("--help")
    assert result.returncode == 0
    listed = re.findall(r"^│ ([a-z]+) {2,}\S", result.stdout, flags=re.MULTILINE)  # rows of the Commands box
    assert listed == COMMANDS
    monkeypatch.setenv("COLUMNS", "200")
    for command in COMMANDS:
        assert cli_main([command, "--help"]) == 0, command
        out = capsys.readouterr().out
        assert re.search(rf"Usage: .*\b{command} \[OPTIONS\]", out), command
        assert "Example" in out and re.search(rf"llmstages .*{command}", out), command  # shows how to call it


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


def test_generate_streams_the_same_text_as_json_and_reads_the_prompt_from_stdin(cli, gpt2_run):
    result = cli("generate", "tiny", "Hello", "-n", "12", "-t", "0")
    assert result.returncode == 0, result.stderr
    assert re.search(r"12 tokens, [0-9.]+ tokens/s", result.stderr)
    as_json = json.loads(cli("generate", "tiny", "Hello", "-n", "12", "-t", "0", "--json").stdout)
    assert as_json["completion"] and result.stdout == as_json["completion"] + "\n"  # the text, streamed
    piped = cli("generate", "tiny", "-", "-n", "12", "-t", "0", "--json", input="Hello")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == {**as_json, "tokens_per_s": json.loads(piped.stdout)["tokens_per_s"],
                                        "seconds": json.loads(piped.stdout)["seconds"]}


def test_ctrl_c_during_generate_exits_130(gpt2_run):
    proc = subprocess.Popen([sys.executable, "-m", "llmstages", "generate", "tiny", "Hello", "-n", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # xdist ignores SIGINT
    assert proc.stdout.read(20)  # streaming has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err


def test_unknown_model_is_exit_2_with_a_hint(cli, gpt2_run):
    result = cli("generate", "nosuchrun", "Hello")
    assert result.returncode == 2
    assert "no run named 'nosuchrun'" in result.stderr
    assert "tiny" in result.stderr  # lists the runs that exist
    assert "Traceback" not in result.stderr


def test_bad_option_is_exit_2_naming_the_option(cli, gpt2_run):
    result = cli("generate", "tiny", "Hello", "--temperature", "-1")
    assert result.returncode == 2
    assert "Invalid value for '--temperature' / '-t'" in result.stderr  # names the option (the rest is click's)
    assert "Traceback" not in result.stderr
    unknown = cli("generate", "tiny", "Hello", "--temprature", "1")
    assert unknown.returncode == 2 and "No such option: --temprature" in unknown.stderr


def test_runs_and_show(cli, gpt2_run):
    runs = cli("runs")
    assert runs.returncode == 0 and "tiny" in runs.stdout
    show = cli("show", "tiny", "--json")
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["config"]["n_layer"] == 1 and data["lineage"][0]["step"] == 3
