"""finetune.soup: N fine-tuned members (seeds seed..seed+N-1) averaged into the run; weight averaging
with LoRA adapters merged first; the start checks; an ensemble (the same members' training) killed
inside its second member resumes to the same model bit for bit.

Tiny models built here; small synthetic labeled files in tmp dirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmstages.averaging import commit_average
from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.config import build_recipe
from llmstages.errors import RecipeError, UserError
from llmstages.lora import merge_lora
from llmstages.model import GPT, GPTConfig
from llmstages.stages.finetune import finetune
from llmstages.store import Store
from spamdata import env_for, finetune_cli, kill_once_written, labeled_rows, quiet, save_base, spam_tokenizer
from spamdata import write_tsv


@pytest.fixture(scope="module")
def tokenizer():
    return spam_tokenizer()


def raw_recipe(source: Path, **finetune_keys) -> dict:
    return {"task": "classify", "run": "clf", "init_from": "base",
            "data": {"source": [str(source)], "columns": ["label", "text"], "val_fraction": 0.2, "test_fraction": 0.2},
            "train": {"max_steps": 4, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 1,
                      "eval_every": 2, "save_every": 2, "log_every": 1, "lr": 3e-3, "min_lr": 3e-4, "seed": 7,
                      "best_metric": "none"},
            "finetune": finetune_keys}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_a_soup_of_two_averages_two_seeds_and_is_the_model_the_run_names(tmp_path, store_dir, tokenizer):
    save_base(store_dir, tokenizer)
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(60))
    store = Store(store_dir)
    result = finetune(build_recipe(raw_recipe(source, soup=2)), store, console=quiet())

    members = [store.latest(f"clf-member{k}") for k in (1, 2)]
    assert [m.name for m in members] == ["step-000004", "step-000004"]
    seeds = [yaml.safe_load((m.parent / "recipe.yaml").read_text())["train"]["seed"] for m in members]
    assert seeds == [7, 8]  # the recipe's seed, then the next
    a, b = (weights(m) for m in members)
    assert not torch.equal(a["score.weight"], b["score.weight"])  # another seed: another model

    soup = store.latest("clf")
    assert store.checkpoints("clf") == [soup] and store.resolve("clf") == soup == result.checkpoint
    mean = weights(soup)
    assert mean.keys() == a.keys() and all(torch.allclose(mean[k], (a[k] + b[k]) / 2, atol=1e-6) for k in mean)
    assert load_checkpoint(soup).meta["soup"] == [str(m) for m in members]
    report = json.loads((store.run_dir("clf") / "test_metrics.json").read_text())
    assert report["checkpoint"] == str(soup)  # the soup is what the test split scores
    for m in members:  # and each member was scored as the ordinary run it is
        assert json.loads((m.parent / "test_metrics.json").read_text())["checkpoint"] == str(m)


def test_soup_settings_and_starts_are_checked_before_anything_is_written(tmp_path, store_dir, tokenizer):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(40))
    with pytest.raises(RecipeError, match="finetune.soup"):
        build_recipe(dict(raw_recipe(source, soup=2), task="instruct"))
    with pytest.raises(RecipeError, match="finetune.soup"):
        build_recipe(raw_recipe(source, soup=2, average_last=2), ["train.keep_last=2"])
    with pytest.raises(RecipeError, match="finetune.soup"):
        build_recipe(raw_recipe(source, soup=0))

    save_base(store_dir, tokenizer)
    store = Store(store_dir)
    plan = finetune(build_recipe(raw_recipe(source, soup=3)), store, dry_run=True, console=quiet())
    assert plan["soup members"] == 3 and not store.run_dir("clf-member1").exists()
    assert plan["estimated time (min)"] == pytest.approx(3 * plan["estimated time per member (min)"], abs=0.02)
    with pytest.raises(UserError, match="no member checkpoint"):
        finetune(build_recipe(raw_recipe(source, soup=2)), store, resume=True, console=quiet())
    finetune(build_recipe(raw_recipe(source)), store, console=quiet())  # a plain run named clf-member2
    finetune(build_recipe(dict(raw_recipe(source), run="clf-member2")), store, console=quiet())
    store.run_dir("clf").rename(store.run_dir("other"))
    before = sorted(p.name for p in store.root.rglob("*"))
    with pytest.raises(UserError, match="clf-member2"):
        finetune(build_recipe(raw_recipe(source, soup=2)), store, console=quiet())
    assert sorted(p.name for p in store.root.rglob("*")) == before


def test_averaging_merges_lora_adapters_first(store_dir, tokenizer):
    store = Store(store_dir)
    paths, merged = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                              lora_rank=2, lora_alpha=4.0, lora_targets=["c_attn"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # adapters that change the weights (B starts at zero)
        paths.append(save_checkpoint(store, f"m{seed}", 1, model, tokenizer, {"task": "pretrain"}))
        merge_lora(model)
        merged.append(model.state_for_saving())
    mean = weights(commit_average(store, "avg", paths, {}))
    assert not any("lora" in k for k in mean)
    for k in mean:  # the mean of W + BA, not (mean W) + (mean B)(mean A)
        assert torch.allclose(mean[k], (merged[0][k] + merged[1][k]) / 2, atol=1e-6), k


@pytest.mark.slow
def test_an_ensemble_killed_in_its_second_member_resumes_to_the_same_model(tmp_path, tokenizer):
    """finetune.ensemble shares the members' training with finetune.soup (stages/soup.py); its members here
    pack their texts (finetune.packing), so a packed classification run is killed and resumed too."""
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    raw = raw_recipe(source, ensemble=2, packing=True)
    raw["train"].update(max_steps=40, save_every=10, eval_every=10, log_every=10)
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    stores = {name: tmp_path / name for name in ("straight", "killed")}
    for store in stores.values():
        save_base(store, tokenizer)
    done = subprocess.run(finetune_cli(recipe), capture_output=True, text=True, env=env_for(stores["straight"]),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = stores["killed"]
    kill_once_written(finetune_cli(recipe), killed, killed / "runs/clf-member2/step-000010")
    latest = Store(killed).latest("clf-member2")
    assert latest is not None and latest.name != "step-000040", "the kill must land inside member 2"
    assert Store(killed).latest("clf") is None
    resumed = subprocess.run(finetune_cli(recipe, "--resume"), capture_output=True, text=True, env=env_for(killed),
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in ("clf-member1", "clf-member2", "clf"):
        a = weights(Store(stores["straight"]).latest(run))
        b = weights(Store(killed).latest(run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


@pytest.mark.slow
def test_a_soup_under_torchrun_matches_one_process(tmp_path, tokenizer):
    """The members train one after another in one process group (torchrun's cannot be joined twice:
    before, the second member hung); two processes give the single process's soup."""
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    raw = raw_recipe(source, soup=2)
    raw["train"].update(max_steps=6, micro_batch_size=4, global_batch_size=8, save_every=3, eval_every=3)
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    stores = {name: tmp_path / name for name in ("one", "two")}
    for store in stores.values():
        save_base(store, tokenizer)
    one = subprocess.run(finetune_cli(recipe), capture_output=True, text=True, env=env_for(stores["one"]), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(29500 + (os.getpid() + 41) % 1000)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                          port, "-m", "llmstages", "finetune", str(recipe)], capture_output=True, text=True,
                         env=env_for(stores["two"]), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for run in ("clf-member1", "clf-member2", "clf"):
        a, b = (weights(Store(stores[name]).latest(run)) for name in ("one", "two"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), run


def test_checkpoints_of_different_models_are_not_averaged(store_dir, tokenizer):
    store = Store(store_dir)
    paths = []
    for layers in (1, 2):
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=layers, n_head=2, n_embd=16))
        paths.append(save_checkpoint(store, f"m{layers}", 1, model, tokenizer, {"task": "pretrain"}))
    with pytest.raises(UserError, match="their tensors differ"):
        commit_average(store, "avg", paths, {})
    assert store.latest("avg") is None
