"""CLI paths no other test runs: recipes, readable show/runs/evaluate, export and merge, chat on the wrong
model, Ctrl-C during a chat reply, bad or empty evaluation data, the finetune checks on init_from and
trainable. One small store of random models is shared by the module (nothing here trains)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.cli import main as cli_main
from llmstages.config import read_yaml
from llmstages.lora import LoRALinear
from llmstages.model import GPT, GPTConfig
from llmstages.store import Store
from llmstages.templates import format_prompt
from llmstages.tokenizer import train_bpe

REPO = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat and a dog ran to the red house where my friend lives".split()


def model(tok, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, **kw)).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """runs: lm (pretrain), inst (alpaca instruct), clf (ham/spam classifier), lora (instruct + LoRA adapters)."""
    root = tmp_path_factory.mktemp("paths") / "store"
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(2000))
    tok = train_bpe([text, format_prompt("alpaca", "Name a color.")], 300)
    s = Store(root)
    lm = save_checkpoint(s, "lm", 3, model(tok), tok, {"task": "pretrain", "metrics": {"val_loss": 5.5}})
    save_checkpoint(s, "inst", 4, model(tok), tok, {"task": "instruct", "template": "alpaca",
                                                    "parent": {"ref": "lm", "path": str(lm), "step": 3}})
    save_checkpoint(s, "clf", 5, model(tok, num_classes=2, class_names=["ham", "spam"]), tok, {"task": "classify"})
    lora = model(tok, lora_rank=2, lora_alpha=4.0, lora_targets=["c_attn"])
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)  # adapters that change the outputs, so merging is visible
    save_checkpoint(s, "lora", 6, lora, tok, {"task": "instruct", "template": "alpaca"})
    return root


@pytest.fixture
def run_main(store, capsys, monkeypatch):
    """`llmstages --store STORE ARGS` in this process: (exit code, stdout, stderr)."""
    import llmstages.cli as cli_module

    for console in (cli_module.console, cli_module.err_console):  # made at import: COLUMNS is read then
        monkeypatch.setattr(console, "width", 200)

    def call(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO(stdin))
        capsys.readouterr()
        code = cli_main(["--store", str(store), *args])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt as in a shell. An xdist worker ignores SIGINT, and Python
    keeps an inherited 'ignore', so without this the child would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def squeezed(text: str) -> str:
    return " ".join(text.split())


# --- browse ----------------------------------------------------------------------------------------------------
def test_recipes_lists_every_builtin_recipe_with_its_task(run_main):
    code, out, _ = run_main("recipes")
    assert code == 0
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^│ (\S+)\s+│ (\w+)\s+│", out, flags=re.MULTILINE)}
    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert files and sorted(rows) == sorted(p.stem for p in files)
    for path in files:
        assert rows[path.stem] == read_yaml(path).get("task", "pretrain"), path.stem


def test_show_and_runs_are_readable(run_main, store):
    code, out, _ = run_main("show", "inst")
    assert code == 0
    assert out.startswith(f"{store / 'runs/inst/step-000004'}  task=instruct  step=4")
    assert re.search(r"│ n_layer\s+│ 1\s+│", out) and re.search(r"│ vocab_size\s+│ 300\s+│", out)
    assert re.search(r"lineage.*\n\s+\S+/runs/inst/step-000004\s+task=instruct step=4\n"
                     r"\s+└─ \S+/runs/lm/step-000003\s+task=pretrain step=3\n", out)
    code, out, _ = run_main("show", "lm")
    assert code == 0 and re.search(r"│ val_loss\s+│ 5\.5\s+│", out)  # the stored metrics
    code, out, _ = run_main("runs")
    assert code == 0
    # captured stdout is not a terminal: plain tab-separated rows (run, task, checkpoints, last step, ...)
    assert re.search(r"^lm\tpretrain\t1\t3\t", out, flags=re.MULTILINE)
    assert re.search(r"^clf\tclassify\t1\t5\t", out, flags=re.MULTILINE)


def test_runs_in_an_empty_store_says_how_to_start(tmp_path, run_main, capsys):
    assert cli_main(["--store", str(tmp_path / "empty"), "runs"]) == 0
    out = squeezed(capsys.readouterr().out)
    assert "no runs in" in out and "start with `llmstages pretrain quickstart`" in out


# --- merge, export ---------------------------------------------------------------------------------------------
def test_merge_writes_a_plain_model_with_the_same_outputs(run_main, store):
    code, out, err = run_main("merge", "lora")
    assert code == 0, err
    merged_path = store / "runs/lora-merged/step-000006"
    assert squeezed(out) == squeezed(f"merged the LoRA adapters of lora into {merged_path}")
    lora, merged = load_checkpoint("lora", Store(store)), load_checkpoint("lora-merged", Store(store))
    assert merged.model.config.lora_rank == 0 and not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    assert merged.meta["template"] == "alpaca" and merged.meta["parent"]["ref"] == "lora"
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(merged.model(idx), lora.model.eval()(idx), atol=1e-5)
        assert not torch.allclose(merged.model(idx), load_checkpoint("lm", Store(store)).model(idx), atol=1e-3)
    code, _, err = run_main("merge", "lora")
    assert code == 2 and "run 'lora-merged' already exists" in squeezed(err)
    code, _, err = run_main("merge", "lm")
    assert code == 2 and "lm has no LoRA adapters: there is nothing to merge" in squeezed(err)


@pytest.mark.parametrize("run,kind", [("lm", "GPT2LMHeadModel"), ("clf", "GPT2ForSequenceClassification")])
def test_export_writes_a_transformers_folder(run_main, tmp_path, run, kind):
    out_dir = tmp_path / "export"
    code, out, err = run_main("export", run, "--format", "hf", "--out", str(out_dir))
    assert code == 0, err
    assert f"as {kind}" in squeezed(out) and "from_pretrained" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [kind] and config["n_layer"] == 1 and config["vocab_size"] == 300
    files = {p.name for p in out_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json"} <= files and ("generation_config.json" in files) == (run == "lm")
    code, _, err = run_main("export", run, "--format", "onnx", "--out", str(tmp_path / "x"))
    assert code == 2 and "--format onnx: unknown export format" in err


# --- evaluate --------------------------------------------------------------------------------------------------
def test_evaluate_is_readable_and_refuses_bad_or_empty_data(run_main, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(WORDS * 20))
    code, out, err = run_main("evaluate", "lm", "--data", str(text))
    assert code == 0, err
    assert re.search(r"│ loss\s+│ \d+\.\d+", out) and re.search(r"│ perplexity\s+│ \d", out)
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_main("evaluate", "lm", "--data", str(tmp_path / "empty.txt"))
    assert code == 2 and "empty.txt:1: empty file" in squeezed(err) and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "ham"}) + "\n{broken\n")
    code, _, err = run_main("evaluate", "clf", "--data", str(bad))
    assert code == 2 and "1 bad record in the evaluation data" in squeezed(err) and "bad.jsonl:2: invalid JSON" in err
    code, _, err = run_main("evaluate", "lm", "--data", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err


def test_evaluate_instruct_shows_samples(run_main, tmp_path):
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name a color {i}.", "input": "", "output": "red"}) + "\n"
                            for i in range(2)))
    code, out, err = run_main("evaluate", "inst", "--data", str(data))
    assert code == 0, err
    assert re.search(r"│ rouge_l\s+│", out) and out.count("instruction:") == 2 and out.count("reference: red") == 2
    code, _, err = run_main("evaluate", "clf", "--data", str(data), "--template", "alpaca")
    assert code == 2 and "clf is a classifier; --template applies to language models" in squeezed(err)
    code, _, err = run_main("evaluate", "lm", "--data", str(data), "--template", "vicuna")
    assert code == 2 and "--template vicuna: unknown template" in err


# --- chat --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run,message", [("clf", "/runs/clf/step-000005 is a classifier"),
                                         ("lm", "/runs/lm/step-000003 is not an instruction model")])
def test_chat_refuses_a_model_it_cannot_talk_to(run_main, run, message):
    code, _, err = run_main("chat", run, stdin="hello\n")
    assert code == 2 and message in squeezed(err) and "Traceback" not in err


def test_ctrl_c_during_a_chat_reply_stops_the_reply_not_the_chat(store):
    proc = subprocess.Popen([sys.executable, "-m", "llmstages", "--store", str(store), "chat", "inst", "-t", "0",
                             "-n", "1000000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=default_sigint)
    proc.stdin.write(b"Name a color.\n")
    proc.stdin.flush()
    assert proc.stdout.read(30)  # the reply is streaming (a million tokens: it cannot end by itself)
    proc.send_signal(signal.SIGINT)
    proc.stdin.write(b"/quit\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]  # the chat went on to read /quit
    assert b"(reply interrupted)" in err and b"Traceback" not in err


# --- finetune checks -----------------------------------------------------------------------------------------
def test_finetune_checks_init_from_before_any_work(run_main, store):
    code, _, err = run_main("finetune", "--task", "spam", "init_from=")
    assert code == 2 and "fine-tuning needs a starting point: init_from is not set" in squeezed(err)
    code, _, err = run_main("finetune", "--task", "spam")  # the built-in recipe starts from quickstart
    assert code == 2 and "init_from=quickstart: that base model has not been trained yet" in squeezed(err)
    assert "llmstages pretrain quickstart" in squeezed(err)
    code, _, err = run_main("finetune", "--task", "spam", "init_from=nosuch")
    assert code == 2 and "no run named 'nosuch'" in squeezed(err)
    assert not (store / "data").exists()  # refused before preparing anything


@pytest.mark.parametrize("mode,message", [
    ("last_blocks:5", "finetune.trainable=last_blocks:5: the model has 1 blocks"),
    ("head", "finetune.trainable=head needs a class head")])
def test_finetune_checks_trainable(run_main, tmp_path, mode, message):
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n"
                            for i in range(20)))
    code, _, err = run_main("finetune", "--task", "instruct", "init_from=inst", f"data.source={data}",
                            f"finetune.trainable={mode}", "run=ft-check", "--dry-run")
    assert code == 2, err
    assert message in squeezed(err)


def test_show_lineage_of_a_lost_parent_and_of_a_hugging_face_start(run_main, store, tmp_path):
    ckpt = load_checkpoint("lm", Store(store))
    gone = tmp_path / "deleted-run" / "step-000001"
    save_checkpoint(Store(store), "orphan", 1, ckpt.model, ckpt.tokenizer,
                    {"task": "instruct", "parent": {"ref": "deleted-run", "path": str(gone), "step": 1}})
    save_checkpoint(Store(store), "from-hf", 1, ckpt.model, ckpt.tokenizer,
                    {"task": "classify", "parent": {"ref": "hf:gpt2", "step": None}})
    code, out, _ = run_main("show", "orphan")
    assert code == 0 and re.search(r"└─ deleted-run\s+\(not found\)", out)
    code, out, _ = run_main("show", "from-hf", "--json")
    assert code == 0
    assert [c["ref"] for c in json.loads(out)["lineage"]][1:] == ["hf:gpt2"]
    assert json.loads(out)["lineage"][1]["task"] == "pretrained (Hugging Face)"


def test_a_checkpoint_with_unreadable_files_is_exit_2(run_main, store):
    ckpt = load_checkpoint("lm", Store(store))
    path = save_checkpoint(Store(store), "broken", 1, ckpt.model, ckpt.tokenizer, {"task": "pretrain"})
    (path / "model.safetensors").write_bytes(b"\0" * (path / "model.safetensors").stat().st_size)  # same size
    code, _, err = run_main("generate", "broken", "hi")
    assert code == 2 and f"{path / 'model.safetensors'}: contents do not match MANIFEST" in squeezed(err)
    assert "run@STEP" in err  # the hint: load an earlier checkpoint
    with pytest.raises(Exception) as raised:
        load_checkpoint(path, Store(store), check_hashes=False)  # past the hash check: our error, not safetensors'
    assert type(raised.value).__name__ == "UserError"
    assert f"{path / 'model.safetensors'}: corrupt weights file" in str(raised.value)


def test_chat_notes_an_unused_system_message_and_skips_blank_lines(run_main):
    code, out, err = run_main("chat", "inst", "-t", "0", "-n", "3", "--system", "Be brief.",
                              stdin="\n   \nName a color.\n/quit\n")
    assert code == 0, err
    assert "--system is used by the chat template only; this model uses alpaca" in squeezed(err)
    assert out.count("\n") == 1  # one reply: the blank lines were not messages
    assert "(reply cut at 3 tokens)" in err


def test_chat_on_a_terminal_uses_input_with_a_prompt(monkeypatch):
    from llmstages.stages import chat as chat_stage
    asked, answers = [], iter(["hello"])

    def fake_input(prompt):
        asked.append(prompt)
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", fake_input)
    assert chat_stage.terminal_read_line("> ") == "hello"
    assert chat_stage.terminal_read_line("> ") is None  # Ctrl-D
    assert asked == ["> ", "> "]
