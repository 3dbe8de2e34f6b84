"""Messages and defaults a new user meets: the missing-matplotlib note (once), instruction JSON evaluated
on a base model, a fine-tune under a new run name reusing the prepared dataset, the model.size comment."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from llmstages.checkpoint import save_checkpoint
from llmstages.cli import main as cli_main
from llmstages.config import build_recipe
from llmstages.errors import UserError
from llmstages.model import GPT, GPTConfig
from llmstages.modelconfig import SIZES
from llmstages.stages.prepare import get_or_prepare, prepare
from llmstages.store import Store
from llmstages.tokenizer import train_bpe
from llmstages.weights import config_from_mapping

SCRIPT = Path(__file__).parent / "scripts" / "train_synthetic.py"


def test_without_matplotlib_the_run_says_once_that_no_loss_png_is_drawn(tmp_path):
    # matplotlib blocked in the child (None in sys.modules: `import matplotlib` fails, find_spec is None)
    code = ("import runpy, sys\nsys.modules['matplotlib'] = None\nsys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, str(SCRIPT), str(tmp_path), "4", "train.eval_every=2",
                             "train.save_every=4", "train.log_every=2"], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert "done 4" in result.stdout, result.stderr[-2000:]
    note = "matplotlib is not installed, so no loss.png is drawn"
    assert result.stderr.count(note) == 1 and "pip install 'llmstages[plot]'" in result.stderr
    assert not (tmp_path / "runs/syn/loss.png").exists() and (tmp_path / "runs/syn/log.jsonl").exists()


def test_instruction_json_on_a_base_model_suggests_a_template_and_lists_each_problem_once(tmp_path, capsys):
    tok = train_bpe(["the king shall speak of love and war " * 50], 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    store = Store(tmp_path / "store")
    save_checkpoint(store, "base", 1, model, tok, {"task": "pretrain"})
    data = tmp_path / "held-out.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(40)]))
    code = cli_main(["--store", str(store.root), "evaluate", "base", "--data", str(data)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert "40 bad records in the evaluation data (1 distinct problem)" in err
    assert err.count("missing field 'text'") == 1 and "[40 records like this" in err
    assert "--template alpaca" in err
    assert cli_main(["--store", str(store.root), "evaluate", "base", "--data", str(data), "--template", "alpaca",
                     "--limit", "2", "--json"]) == 0  # what the hint says works


def spam_recipe(source: Path, run: str):
    return build_recipe({"task": "classify", "run": run, "data": {"source": [str(source)], "vocab_size": 300,
                                                                   "val_fraction": 0.2, "test_fraction": 0.2}}, [])


def test_a_new_run_name_reuses_the_prepared_dataset_of_the_same_fingerprint(tmp_path):
    rng = random.Random(0)
    words = "win free prize call now see you at lunch tomorrow station".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(8)), "label": "spam" if i % 4 else "ham"}
            for i in range(80)]
    source = tmp_path / "sms.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = Store(tmp_path / "store")
    first = get_or_prepare(spam_recipe(source, "spam-a"), store, Console(file=StringIO()))
    said = StringIO()
    second = get_or_prepare(spam_recipe(source, "spam-b"), store, Console(file=said, width=300))
    assert second.path == first.path and [p.name for p in (store.root / "data").iterdir()] == [first.path.name]
    assert f"using the prepared dataset {first.path}" in said.getvalue()
    forced = prepare(spam_recipe(source, "spam-b"), store, console=Console(file=StringIO()), force=True)
    assert forced.path.name.startswith("spam-b-") and forced.fingerprint == first.fingerprint  # --force: its own


def test_the_model_size_comment_names_every_size():
    source = (Path(__file__).parents[1] / "llmstages" / "recipe_schema.py").read_text()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
    size_line = next(n.lineno for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id == "size")
    lines = source.splitlines()[:size_line - 1]
    comment = []
    while lines and lines[-1].strip().startswith("#"):
        comment.insert(0, lines.pop())
    text = " ".join(comment)
    for name in [*SIZES, "custom"]:
        assert f"{name} " in text or f"{name}," in text, name


def test_one_is_singular_in_counts(tmp_path, capsys):
    store = Store(tmp_path / "store")
    with store.commit("r", 1) as tmp:  # a checkpoint without weights: verify finds it bad
        (tmp / "meta.json").write_text(json.dumps({"task": "pretrain"}))
        (tmp / "model.json").write_text(json.dumps({"vocab_size": 300}))
    assert cli_main(["--store", str(store.root), "verify", "r"]) == 2
    assert "1 folder checked, 1 bad" in capsys.readouterr().out


def test_lora_rank_without_usable_targets_is_an_impossible_model_config():
    """model.json with adapters but no layer to put them on: a UserError naming the file and the field
    (it was a bare ValueError from add_lora, found by the model.json fuzz test)."""
    for targets in ([], ["wte"]):
        with pytest.raises(UserError) as err:
            config_from_mapping({"vocab_size": 300, "lora_rank": 1, "lora_targets": targets}, "r/step-1/model.json")
        assert "r/step-1/model.json" in err.value.message and "lora_targets" in err.value.message
    assert config_from_mapping({"vocab_size": 300, "lora_rank": 1, "lora_targets": ["c_attn"]}, "m").lora_rank == 1
