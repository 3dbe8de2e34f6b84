"""The shared training loop in real subprocesses: exact resume after SIGKILL / SIGTERM, torchrun DDP,
non-finite loss, recipe changes on resume. Uses tests/scripts/train_synthetic.py (no prepare step)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.config import build_recipe
from llmstages.model import GPT, GPTConfig
from llmstages.optim import lr_at, param_groups
from llmstages.store import Store

SCRIPT = Path(__file__).parent / "scripts" / "train_synthetic.py"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(store, steps, *args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), str(store), str(steps), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def log(store) -> list[dict]:
    return [json.loads(line) for line in (Path(store) / "runs/syn/log.jsonl").read_text().splitlines()]


def figures(records):
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("lr"), r.get("tokens")) for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 30-step run."""
    store = tmp_path_factory.mktemp("ref")
    result = run(store, 30)
    assert result.returncode == 0, result.stderr
    return log(store)


def checkpoints(store) -> list[str]:
    return sorted(p.name for p in (Path(store) / "runs/syn").glob("step-*"))


# Each signal is sent by the run itself at an exact micro-batch (mid-step), so where it lands never depends
# on timing: micro-batches 2s and 2s+1 make step s+1.
@pytest.mark.parametrize("sig,micro,code,kept", [
    ("KILL", 31, -9, "step-000010"),  # killed in step 16: the step-10 checkpoint is what is left
    ("TERM", 31, 143, "step-000016"),  # a clean stop commits step 16, mid log window (partial loss saved)
    ("INT", 11, 130, "step-000006")])
def test_resume_after_a_kill_is_exact(tmp_path, reference, sig, micro, code, kept):
    stopped = run(tmp_path, 30, "--signal", f"{sig}@{micro}")
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert checkpoints(tmp_path)[-1] == kept
    if sig != "KILL":
        assert "Resume with:" in stopped.stdout + stopped.stderr  # a clean stop says how to continue
    resumed = run(tmp_path, 30, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert figures(log(tmp_path)) == figures(reference)  # every logged figure, bit for bit


def test_second_ctrl_c_exits_at_once(tmp_path):
    result = run(tmp_path, 30, "--signal", "INT@10", "--signal", "INT@11")  # both inside step 6
    assert result.returncode == 130, result.stderr[-3000:]
    assert "second interrupt" in result.stdout + result.stderr
    assert "Resume with:" not in result.stdout + result.stderr
    assert not list((tmp_path / "runs/syn").glob("step-*"))  # no checkpoint, not even a partial one
    assert not list((tmp_path / "runs/syn").glob(".tmp-*"))


def test_non_finite_loss_stops_without_a_later_checkpoint(tmp_path):
    result = run(tmp_path, 30, "--nan-at", "13")
    assert result.returncode == 1
    assert "non-finite (nan/inf) at step 14" in result.stderr
    assert "step-000010" in result.stderr  # names the last good checkpoint
    steps = sorted(p.name for p in (tmp_path / "runs/syn").glob("step-*"))
    assert steps == ["step-000010"]


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory):
    """A finished 10-step run, copied into each test that starts from one (one training run, not four)."""
    store = tmp_path_factory.mktemp("ten")
    result = run(store, 10)
    assert result.returncode == 0, result.stderr
    return store


@pytest.fixture
def after_ten(tmp_path, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_resume_with_a_changed_recipe_is_refused_unless_allowed(after_ten):
    tmp_path = after_ten
    refused = run(tmp_path, 20, "--resume")
    assert refused.returncode == 2
    assert "train.max_steps: 10 -> 20" in refused.stderr and "--allow-change" in refused.stderr
    assert run(tmp_path, 20, "--resume", "--allow-change").returncode == 0
    assert log(tmp_path)[-1]["step"] == 20


def test_resume_refuses_other_shapes_and_other_data(after_ten):
    tmp_path = after_ten
    reshaped = run(tmp_path, 10, "--resume", "--allow-change", "model.n_layer=3")
    assert reshaped.returncode == 2 and "cannot be resumed with another model.n_layer" in reshaped.stderr
    other_blocks = run(tmp_path, 10, "--resume", "--allow-change", "model.norm=rmsnorm")  # same shapes
    assert other_blocks.returncode == 2 and "cannot be resumed with another model.norm" in other_blocks.stderr
    other_data = run(tmp_path, 10, "--resume", "--data", "another-corpus")
    assert other_data.returncode == 2 and "the training data differs" in other_data.stderr
    assert "--allow-change" in other_data.stderr
    allowed = run(tmp_path, 20, "--resume", "--allow-change", "--data", "another-corpus")
    assert allowed.returncode == 0, allowed.stderr  # the user said the change is intended
    assert [r["step"] for r in log(tmp_path) if "loss" in r][-1] == 20
    retokenized = run(tmp_path, 20, "--resume", "--allow-change", "--data", "another-corpus", "--vocab", "280")
    assert retokenized.returncode == 2 and "another tokenizer" in retokenized.stderr  # never allowed


def test_a_fresh_start_replaces_the_log_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "syn"
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text(json.dumps({"step": 5, "loss": 99.0}) + "\n")  # left by the killed run
    assert run(tmp_path, 10).returncode == 0
    assert all(r.get("loss") != 99.0 for r in log(tmp_path))
    assert [r["step"] for r in log(tmp_path) if "loss" in r] == [5, 10]


def test_existing_run_without_resume_is_refused(after_ten):
    again = run(after_ten, 10)
    assert again.returncode == 2 and "already has checkpoints" in again.stderr
    assert "--resume" in again.stderr and checkpoints(after_ten) == ["step-000010"]


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    result = run(tmp_path, 10, "--resume")
    assert result.returncode == 2 and "run 'syn' has no checkpoint to resume from" in result.stderr
    assert not (tmp_path / "runs/syn").exists() or not checkpoints(tmp_path)


def test_resume_skips_a_newest_checkpoint_without_train_state(after_ten):
    """A model-only checkpoint (as merge or an export import writes) is the newest: resume says why it skips
    it and goes on from the newest checkpoint it can resume from (step 10)."""
    ckpt = load_checkpoint("syn@10", Store(after_ten))
    model_only = save_checkpoint(Store(after_ten), "syn", 20, ckpt.model, ckpt.tokenizer, dict(ckpt.meta))
    result = run(after_ten, 30, "--resume", "--allow-change")
    assert result.returncode == 0, result.stderr
    assert "skipping step-000020 of syn, it does not verify" in result.stderr
    assert f"{model_only}: has no train state to resume from" in result.stderr
    assert "resuming at step 10" in result.stderr


def test_torchrun_two_processes_match_one_process(tmp_path, reference):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master-port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(tmp_path), "30"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = log(tmp_path)
    assert [r["step"] for r in ddp] == [r["step"] for r in reference]
    for one, two in zip(reference, ddp):
        key = "loss" if "loss" in one else "val_loss"
        assert two[key] == pytest.approx(one[key], rel=1e-4)  # same batches; only summation order differs
        assert two.get("tokens") == one.get("tokens")


def test_torchrun_two_processes_with_adversarial_training_match_one_process(tmp_path):
    """A classifier trained with finetune.adversarial_eps (two forwards per micro-batch, a gradient taken
    at the embeddings of the DDP-wrapped model before the backward) logs what one process logs."""
    args = ["--classify", "finetune.adversarial_eps=0.5"]
    one = run(tmp_path / "one", 20, *args)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master-port", str(29500 + (os.getpid() + 29) % 1000), str(SCRIPT), str(tmp_path / "two"),
                          "20", *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    plain = run(tmp_path / "plain", 20, "--classify")
    assert plain.returncode == 0, plain.stderr[-3000:]
    single, ddp = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for a, b in zip(single, ddp):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-4)
    assert [r.get("loss") for r in single] != [r.get("loss") for r in log(tmp_path / "plain")]  # the option acts
    killed = tmp_path / "killed"  # killed in step 16, resumed from step 10: the straight run's figures, bit for bit
    assert run(killed, 20, *args, "--signal", "KILL@31").returncode == -9
    resumed = run(killed, 20, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert figures(log(killed)) == figures(single)


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    cfg = build_recipe({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}}).train
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    assert "transformer.wte.weight" in {names[id(p)] for p in no_decay["params"]}


def test_torchrun_stop_and_resume_matches_one_process(tmp_path, reference):
    """SIGTERM to torchrun mid-window: every rank stops at the same step, the committed partial loss is
    the mean over ranks, and the resumed 2-process run logs the 1-process figures (the step-10 loss
    includes the partial window saved at the stop, so a wrong partial loss shows there)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master-port", str(29500 + (os.getpid() + 7) % 1000), str(SCRIPT), str(tmp_path), "30"]
    # rank 0 sends SIGTERM to torchrun's agent during step 7 (its micro-batch 12), as `kill <torchrun>` would
    stopped = subprocess.run(launch, capture_output=True, text=True, env=dict(ENV, SYN_SIGNAL="TERM@12@parent"),
                             timeout=600)
    assert stopped.returncode != 0, stopped.stderr[-3000:]  # torchrun reports the stop as a failure
    kept = checkpoints(tmp_path)
    assert kept and kept[-1] in ("step-000007", "step-000008"), (kept, stopped.stderr[-3000:])  # mid-window
    resumed = subprocess.run([*launch, "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ddp = log(tmp_path)
    assert [r["step"] for r in ddp] == [r["step"] for r in reference]
    for one, two in zip(reference, ddp):
        key = "loss" if "loss" in one else "val_loss"
        assert two[key] == pytest.approx(one[key], rel=1e-4), (one, two)


# --- Muon + AdamW, modern blocks, warmup-stable-decay ------------------------------------------------------
@pytest.mark.parametrize("world, printed", [("1", "work done\nteardown ran\n"), ("2", "work done\n")])
def test_a_torchrun_worker_ends_without_the_interpreter_teardown(world, printed):
    """exit_process: a worker (WORLD_SIZE > 1) flushes its output and skips the teardown, where a gloo
    thread still letting go of a finished collective could abort it; a plain process exits as usual."""
    code = ("import atexit; from llmstages.distributed import exit_process; "
            "atexit.register(lambda: print('teardown ran')); print('work done'); exit_process(3)")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(ENV, WORLD_SIZE=world), timeout=120)
    assert (ended.returncode, ended.stdout) == (3, printed), ended.stderr
    # The CLI ends through it: its output arrives, its exit code is kept
    listed = subprocess.run([sys.executable, "-m", "llmstages", "recipes"], capture_output=True, text=True,
                            env=dict(ENV, WORLD_SIZE=world), timeout=120)
    assert listed.returncode == 0 and "finetune-spam" in listed.stdout, listed.stderr
    refused = subprocess.run([sys.executable, "-m", "llmstages", "pretrain", "no-such-recipe"], capture_output=True,
                             text=True, env=dict(ENV, WORLD_SIZE=world), timeout=120)
    assert refused.returncode == 2 and "no-such-recipe" in refused.stderr


MUON = ("model.arch=modern", "model.n_kv_head=1", "train.optimizer=muon", "train.schedule=wsd",
        "train.decay_frac=0.3", "train.muon_lr=0.02")


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory):
    """An uninterrupted 30-step run of a modern model with Muon."""
    store = tmp_path_factory.mktemp("muon-ref")
    result = run(store, 30, *MUON)
    assert result.returncode == 0, result.stderr
    return log(store)


def test_muon_trains(muon_reference, reference):
    losses = [r["loss"] for r in muon_reference if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert [r["lr"] for r in muon_reference if "lr" in r][-1] == pytest.approx(3e-4)  # ends at min_lr


def test_muon_resume_after_a_kill_is_exact(tmp_path, muon_reference):
    stopped = run(tmp_path, 30, "--signal", "KILL@31", *MUON)  # killed in step 16, at an exact micro-batch
    assert stopped.returncode == -9, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "runs/syn/step-000010/train_state.pt", weights_only=True)
    assert set(state["optimizer"]) == {"adamw", "muon"}  # both optimizers' states are in the checkpoint
    resumed = run(tmp_path, 30, "--resume", *MUON)
    assert resumed.returncode == 0, resumed.stderr
    assert figures(log(tmp_path)) == figures(muon_reference)  # every logged figure, bit for bit


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    assert run(tmp_path, 10).returncode == 0
    switched = run(tmp_path, 20, "--resume", "--allow-change", "train.optimizer=muon")
    assert switched.returncode == 2 and "train.optimizer the run started with" in switched.stderr


def test_torchrun_two_processes_with_muon_match_one_process(tmp_path, muon_reference):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master-port", str(29500 + (os.getpid() + 13) % 1000), str(SCRIPT), str(tmp_path),
                             "30", *MUON], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = log(tmp_path)
    assert [r["step"] for r in ddp] == [r["step"] for r in muon_reference]
    for one, two in zip(muon_reference, ddp):
        key = "loss" if "loss" in one else "val_loss"
        assert two[key] == pytest.approx(one[key], rel=1e-4)  # same batches; only summation order differs


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_lr():
    cfg = build_recipe({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "schedule": "wsd",
                                  "decay_frac": 0.25}}).train
    values = [lr_at(s, cfg, 100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert values[10:75] == [1.0] * 65  # stable until the last quarter
    assert values[75] == pytest.approx(1.0 - 0.9 / 25) and values[99] == pytest.approx(0.1)
    decay = values[75:]
    assert all(x > y for x, y in zip(decay, decay[1:]))
    assert [b - a for a, b in zip(decay, decay[1:])] == pytest.approx([-0.9 / 25] * 24)  # a straight line


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from llmstages.optim import build_optimizer, set_lr

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8, pos_emb="rope",
                          norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True, tie_embeddings=False))
    cfg = build_recipe({"train": {"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.05}}).train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in opt.named["muon"].param_groups for p in g["params"]}
    assert in_muon == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                       "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    in_adamw = {names[id(p)] for g in opt.named["adamw"].param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - in_muon  # embeddings, head, norms (QK-norm included)
    set_lr(opt, 0, cfg, 100)  # warmup step 1 of 100: each group at 1/100 of its own base lr
    assert [g["lr"] for g in opt.named["muon"].param_groups] == pytest.approx([0.05 / 100])
    assert [g["lr"] for g in opt.named["adamw"].param_groups] == pytest.approx([1e-3 / 100] * 2)

    # LoRA fine-tuning of a classifier: the frozen base is in neither; adapters and class head go to AdamW.
    from llmstages.lora import add_lora

    clf = GPT(GPTConfig.from_dict(dict(model.config.to_dict(), num_classes=2)))
    add_lora(clf, 2, 4.0, 0.0, ["c_attn", "c_fc"])
    for name, p in clf.named_parameters():  # as finetune.trainable=lora does
        p.requires_grad_("lora_" in name or name == "score.weight")
    opt = build_optimizer(clf, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in clf.named_parameters()}
    assert "muon" not in opt.named
    assert {names[id(p)] for g in opt.param_groups for p in g["params"]} == {
        "score.weight", *(f"transformer.h.0.{m}.lora_{ab}" for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB")}


def test_an_adamw_checkpoint_from_before_muon_still_loads():
    from llmstages.optim import build_optimizer

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    cfg = build_recipe({}).train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    old_format = opt.named["adamw"].state_dict()  # what train_state.pt held before
    again = build_optimizer(model, cfg, torch.device("cpu"))
    again.load_state_dict(old_format)
    assert again.state_dict()["adamw"]["state"].keys() == old_format["state"].keys()


# --- settings the default host never picks: precision both ways, torch.compile, early stopping -------------
SHORT = ["train.eval_every=2", "train.log_every=2", "train.save_every=4"]


def short_losses(store) -> list[float]:
    return [r["loss"] for r in log(store) if "loss" in r]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("fp32")
    result = run(store, 4, "train.precision=fp32", *SHORT)
    assert result.returncode == 0, result.stderr
    assert "fp32 on cpu" in result.stderr  # the run says which precision it trains in
    return store


def test_bf16_autocast_trains_close_to_fp32(tmp_path, fp32_run):
    result = run(tmp_path, 4, "train.precision=bf16", *SHORT)
    assert result.returncode == 0, result.stderr
    assert "bf16 on cpu" in result.stderr
    bf16, fp32 = short_losses(tmp_path), short_losses(fp32_run)
    assert len(bf16) == len(fp32) == 2 and bf16 != fp32  # bf16 matmuls really ran: not the fp32 numbers
    assert bf16 == pytest.approx(fp32, rel=0.03)


def test_patience_stops_early_when_validation_stops_improving(tmp_path):
    # lr 1e-30: the weights cannot change, so the second evaluation ties the first and patience 1 runs out
    result = run(tmp_path, 30, "train.lr=1e-30", "train.min_lr=0", "train.patience=1", *SHORT)
    assert result.returncode == 0, result.stderr
    assert re.search(r"early stop: val_loss has not improved for 1 evaluation(?!s)", result.stderr)  # one
    assert "done 4" in result.stdout
    evals = [r for r in log(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["val_loss"] == evals[1]["val_loss"]
    assert checkpoints(tmp_path) == ["step-000002", "step-000004"]  # the best, and the stop
    assert json.loads((tmp_path / "runs/syn/best.json").read_text())["step"] == 2
