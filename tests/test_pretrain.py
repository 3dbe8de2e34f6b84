"""`llmstages pretrain` end to end through the CLI, on real text: outputs, dry run, kill + resume, errors."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmstages.checkpoint import load_checkpoint
from llmstages.store import Store

STEPS = 24


def write_recipe(folder: Path, text_file: Path, name: str = "tiny-verdict", **train) -> Path:
    settings = {"max_steps": STEPS, "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 8,
                "save_every": 8, "log_every": 4, "warmup_steps": 4, "lr": 3e-3, "min_lr": 3e-4, "eval_batches": 2}
    settings.update(train)
    lines = [f"description: tiny test run on {text_file.name}", "task: pretrain",
             "data:", f"  source: [{text_file}]", "  tokenizer: train", "  vocab_size: 400", "  val_fraction: 0.1",
             "model:", "  size: tiny", "  block_size: 64", "train:"]
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_figures(store: Path, run: str = "tiny-verdict") -> list[tuple]:
    records = [json.loads(line) for line in (store / "runs" / run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("val_bpb"), r.get("lr"), r.get("tokens"))
            for r in records]


@pytest.fixture
def recipe(tmp_path, data_file):
    return write_recipe(tmp_path, data_file("the-verdict.txt"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_file_module):
    folder = tmp_path_factory.mktemp("reference")
    path = write_recipe(folder, data_file_module("the-verdict.txt"))
    store = folder / "store"
    result = subprocess.run([sys.executable, "-m", "llmstages", "--store", str(store), "pretrain", str(path)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return store, log_figures(store)


@pytest.fixture(scope="module")
def data_file_module():
    from conftest import need_data
    return need_data


def test_pretrain_writes_a_complete_run(reference_run):
    store, figures = reference_run
    run = store / "runs" / "tiny-verdict"
    assert (run / "recipe.yaml").exists()
    steps = Store(store).checkpoints("tiny-verdict")
    assert [p.name for p in steps][-1] == f"step-{STEPS:06d}"
    assert len(steps) <= 3  # keep_last=2 plus the best
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(4, STEPS + 1, 4))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "time"} <= set(train_lines[0])
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(evals[0])
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]  # it learns
    assert (run / "loss.png").exists()
    best = json.loads((run / "best.json").read_text())
    lowest = min(evals, key=lambda r: r["val_loss"])
    assert best == {**best, "metric": "val_loss", "value": lowest["val_loss"], "step": lowest["step"]}
    ckpt = load_checkpoint("tiny-verdict", Store(store))  # a run name alone means its best checkpoint
    assert ckpt.meta["task"] == "pretrain" and ckpt.meta["step"] == best["step"]
    assert ckpt.path.name == f"step-{best['step']:06d}" and ckpt.path in steps  # kept by the pruning
    assert ckpt.meta["metrics"]["val_loss"] == best["value"]
    assert ckpt.meta["tokenizer_fingerprint"] == ckpt.tokenizer.fingerprint
    assert ckpt.meta["data_fingerprint"]


def test_dry_run_prints_the_plan_and_writes_nothing(cli, recipe, store_dir):
    result = cli("pretrain", str(recipe), "train.max_steps=100", "--dry-run")
    assert result.returncode == 0, result.stderr
    for figure in ("parameters", "tokens per step", "estimated time", "peak memory", "tokens per parameter"):
        assert figure in result.stderr
    assert "max_steps: 100" in result.stderr  # the resolved recipe
    assert not (store_dir / "runs").exists()
    # what it does write, as the README says: the prepared dataset, which the table names
    [dataset] = (store_dir / "data").iterdir()
    assert "no run; only the prepared dataset" in " ".join(result.stderr.split()) and dataset.name in result.stderr


def test_dry_run_with_a_time_budget_estimates_the_steps(cli, recipe, store_dir):
    result = cli("pretrain", str(recipe), "train.max_time=2m", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "time budget" in result.stderr and "steps (estimated)" in result.stderr
    bad = cli("pretrain", str(recipe), "train.max_time=2 minutes", "--dry-run")
    assert bad.returncode == 2 and "train.max_time" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("sig,expected", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_killed_pretrain_resumes_exactly(tmp_path, recipe, reference_run, sig, expected):
    _, reference = reference_run
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "llmstages", "--store", str(store), "pretrain", str(recipe)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("step 12"):
            break
    os.kill(proc.pid, sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == expected
    if sig == signal.SIGTERM:
        assert "--resume" in rest  # the clean stop says how to resume
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert log_figures(store) == reference


def test_recipe_typo_is_exit_2_with_a_suggestion(cli, tmp_path, store_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learing_rate: 0.001\nmodel:\n  n_layers: 4\n")
    result = cli("pretrain", str(bad))
    assert result.returncode == 2
    assert "train.learing_rate: unknown key; did you mean `train.lr`?" in result.stderr
    assert "did you mean `model.n_layer`?" in result.stderr
    assert "Traceback" not in result.stderr


def test_override_type_error_is_exit_2(cli, recipe, store_dir):
    result = cli("pretrain", str(recipe), "train.lr=fast")
    assert result.returncode == 2
    assert "train.lr: expected a number, got 'fast'" in result.stderr


def test_continue_from_a_model_with_another_tokenizer_is_refused(cli, tmp_path, reference_run, data_file):
    store, _ = reference_run
    other = write_recipe(tmp_path, data_file("tinystories/tinystories_sample.txt"), name="other")
    text = other.read_text().replace("task: pretrain", f"task: pretrain\ninit_from: {store}/runs/tiny-verdict")
    other.write_text(text)
    result = cli("--store", str(tmp_path / "store2"), "pretrain", str(other))
    assert result.returncode == 2
    assert "tokenizer mismatch" in result.stderr


def test_evaluate_text_reports_bits_per_byte(cli, reference_run, data_file):
    store, _ = reference_run
    text = data_file("the-verdict.txt")  # one document: no end-of-text tokens inside (they carry no bytes)
    result = cli("--store", str(store), "evaluate", "tiny-verdict", "--data", str(text), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(figures) and figures["documents"] == 1
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-6)
    # bits per byte = nats per token x tokens / (bytes x ln 2), the bytes being the file's UTF-8 bytes
    expected = figures["loss"] * figures["tokens"] / (len(text.read_bytes()) * math.log(2))
    assert figures["bits_per_byte"] == pytest.approx(expected, rel=0.005)


def test_torchrun_through_the_cli_matches_one_process(tmp_path, recipe, reference_run):
    """`torchrun -m llmstages pretrain` on a fresh store: rank 1 waits while rank 0 prepares the data,
    then two processes log the one-process figures (same batches; only summation order differs)."""
    _, reference = reference_run
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master-port", str(29500 + (os.getpid() + 13) % 1000), "-m", "llmstages", "--store", str(store),
           "pretrain", str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("preparing dataset") == 1  # rank 0 only
    assert len(list((store / "data").iterdir())) == 1
    ddp = log_figures(store)
    assert [f[0] for f in ddp] == [f[0] for f in reference]
    for one, two in zip(reference, ddp):
        for a, b in zip(one[1:4], two[1:4]):  # loss, val_loss, val_bpb (None where the line has none)
            assert b == (None if a is None else pytest.approx(a, rel=1e-4)), (one, two)
        assert two[5] == one[5]  # tokens


def test_continued_pretraining_from_init_from(cli, tmp_path, reference_run, data_file):
    store, reference = reference_run
    path = write_recipe(tmp_path, data_file("the-verdict.txt"), name="more", max_steps=2, eval_every=2,
                        save_every=2, log_every=1)
    text = path.read_text().replace("tokenizer: train", "tokenizer: auto")  # the base model's tokenizer
    path.write_text(text.replace("task: pretrain", f"task: pretrain\ninit_from: {store}/runs/tiny-verdict"))
    result = cli("--store", str(tmp_path / "store2"), "pretrain", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint("more", Store(tmp_path / "store2"))
    base = load_checkpoint("tiny-verdict", Store(store))
    assert ckpt.meta["parent"]["ref"] == f"{store}/runs/tiny-verdict"
    assert ckpt.meta["parent"]["step"] == base.meta["step"]
    assert ckpt.tokenizer.fingerprint == base.tokenizer.fingerprint and ckpt.model.config == base.model.config
    first = log_figures(tmp_path / "store2", "more")[0]
    assert first[0] == 1 and first[1] < math.log(400) - 0.5  # step 1 starts from trained weights, not ln V
    show = cli("--store", str(tmp_path / "store2"), "show", "more")
    step = base.meta["step"]
    assert show.returncode == 0  # the readable lineage: this run, then its parent one level down
    assert re.search(rf"└─ \S+tiny-verdict/step-0*{step}\s+task=pretrain step={step}\n", show.stdout)
    # data.lowercase: the base's tokenizer gains a Lowercase normalizer, and the continued model keeps it
    lower = cli("--store", str(tmp_path / "store3"), "pretrain", str(path), "data.lowercase=true")
    assert lower.returncode == 0, lower.stderr[-3000:]
    child = load_checkpoint("more", Store(tmp_path / "store3"))
    assert child.tokenizer.lowercases and child.tokenizer.fingerprint == base.tokenizer.lowercased().fingerprint


def test_pretrain_refuses_bad_starting_points_before_step_1(recipe, store_dir, capsys, monkeypatch, tmp_path):
    """In process (each is refused before any training): too small a vocabulary, a classifier to continue
    from, a recipe of another task."""
    import torch

    from llmstages.checkpoint import save_checkpoint
    from llmstages.cli import main as cli_main
    from llmstages.model import GPT, GPTConfig
    from llmstages.tokenizer import train_bpe

    monkeypatch.setenv("COLUMNS", "200")

    def refused(*args: str) -> str:
        assert cli_main(["--store", str(store_dir), *args]) == 2
        return " ".join(capsys.readouterr().err.split())

    assert "model.vocab_size=100 is smaller than the tokenizer's 400 tokens" in refused(
        "pretrain", str(recipe), "model.vocab_size=100")
    tok = train_bpe(["a few words of text"] * 5, 280)
    torch.manual_seed(0)
    clf = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8, num_classes=2,
                        class_names=["a", "b"]))
    save_checkpoint(Store(store_dir), "clf", 1, clf, tok, {"task": "classify"})
    assert "init_from=clf is a classifier; pretraining needs a language model" in refused(
        "pretrain", str(recipe), "init_from=clf")
    assert "the recipe's task is classify; pretrain runs task: pretrain recipes" in refused("pretrain", "finetune-spam")
    assert not (store_dir / "runs" / "tiny-verdict").exists()
