"""train.strategy=fsdp, sharded checkpoints, multi-node launches and activation checkpointing.

The runs are tests/scripts/train_synthetic.py under torchrun (gloo on the CPU), 12 steps of a tiny
model with a checkpoint every 4 steps. Each launch starts Python processes, so they are shared
through module fixtures and marked slow."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmstages.checkpoint import load_checkpoint, verify_checkpoint
from llmstages.config import build_recipe
from llmstages.dryrun import memory_estimate
from llmstages.errors import UserError
from llmstages.lora import add_lora
from llmstages.model import GPT, GPTConfig, set_activation_checkpointing
from llmstages.sampling import generate_tokens
from llmstages.store import Store, read_manifest
from llmstages.weights import read_model_config

SCRIPT = Path(__file__).parent / "scripts" / "train_synthetic.py"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
FSDP = ["train.strategy=fsdp", "train.save_every=4", "train.eval_every=4", "train.log_every=2", "train.precision=fp32"]
STEPS = "12"
_ports = iter(range(29600 + os.getpid() % 300 * 3, 29600 + os.getpid() % 300 * 3 + 400, 7))


def launch(store, *args, procs=1, env=None, timeout=600):
    """train_synthetic.py on `procs` processes: plain Python for one, torchrun for more."""
    head = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                str(procs), "--master-port", str(next(_ports))]
    return subprocess.run([*head, str(SCRIPT), str(store), STEPS, *FSDP, *args], capture_output=True, text=True,
                          env=dict(ENV, **(env or {})), timeout=timeout)


def log(store, run="syn") -> list[dict]:
    return [json.loads(line) for line in (Path(store) / "runs" / run / "log.jsonl").read_text().splitlines()]


def figures(records):
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("lr"), r.get("tokens")) for r in records]


def assert_close(records, reference, *, tokens=True):
    """Same steps, tokens and learning rates; losses equal up to float summation order. (`tokens=False`
    for padded batches: under torchrun the loop counts rank 0's tokens x the number of processes.)"""
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for one, two in zip(reference, records):
        key = "loss" if "loss" in one else "val_loss"
        assert two[key] == pytest.approx(one[key], rel=1e-4), (one, two)
        assert two.get("lr") == one.get("lr") and (two.get("tokens") == one.get("tokens") or not tokens)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """train.strategy=fsdp on one process (nothing to shard; the checkpoints are sharded-format)."""
    store = tmp_path_factory.mktemp("one")
    result = launch(store)
    assert result.returncode == 0, result.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    store = tmp_path_factory.mktemp("two")
    result = launch(store, procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes (fsdp)" in result.stderr
    return store


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-process fsdp run SIGKILLed in step 7 (rank 0's micro-batch 12): step-000004 is its last checkpoint."""
    store = tmp_path_factory.mktemp("killed")
    result = launch(store, procs=2, env={"SYN_SIGNAL": "KILL@12"})
    assert result.returncode != 0
    assert sorted(p.name for p in (store / "runs/syn").glob("step-*")) == ["step-000004"], result.stderr[-3000:]
    return store


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(one, two):
    assert_close(log(two), log(one))


@pytest.mark.slow
def test_a_sharded_checkpoint_is_committed_verified_and_loads_in_one_process(tmp_path, two):
    shutil.copytree(two, tmp_path, dirs_exist_ok=True)
    path = Store(tmp_path).latest("syn")
    shards = sorted(p.name for p in (path / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    assert {f"optimizer/{name}" for name in shards} <= set(read_manifest(path))  # sealed by the MANIFEST
    assert "optimizer" not in torch.load(path / "train_state.pt", weights_only=True)
    assert verify_checkpoint(path) == []
    ckpt = load_checkpoint("syn", Store(tmp_path))  # what generate and export do: one process, full weights
    assert len(list(generate_tokens(ckpt.model, [1, 2, 3], max_new_tokens=4))) == 4

    (path / "optimizer" / "__1_0.distcp").write_bytes(b"broken")
    assert any("__1_0.distcp" in p for p in verify_checkpoint(path))  # the MANIFEST catches a changed shard


@pytest.mark.slow
def test_fsdp_resume_after_a_kill_is_exact(tmp_path, killed, two):
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    resumed = launch(tmp_path, "--resume", procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert figures(log(tmp_path)) == figures(log(two))  # every logged figure, bit for bit


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_one_process(tmp_path, killed, one):
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    resumed = launch(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 4" in resumed.stderr
    assert_close(log(tmp_path), log(one))


def two_nodes(stores, *args, logs: Path):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on 127.0.0.1, as two
    machines would; node r trains with store stores[r]. Returns (exit code, output) per node."""
    port = str(next(_ports))
    procs = []
    for r in (0, 1):
        out = open(logs / f"node{r}.txt", "w")  # a file, not a pipe: a full pipe would stall the whole job
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node",
             "1", "--local-addr", "127.0.0.1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "test", str(SCRIPT), str(stores[r]), STEPS, *FSDP, *args],
            stdout=out, stderr=subprocess.STDOUT, env=ENV), out))
    results = []
    for proc, out in procs:
        code = proc.wait(timeout=600)
        out.close()
        results.append((code, Path(out.name).read_text()))
    return results


@pytest.mark.slow
def test_two_nodes_on_localhost_train_into_one_store(tmp_path, two):
    """Activation checkpointing on as well: the same losses as `two` without it."""
    store = tmp_path / "shared"
    results = two_nodes([store, store], "train.activation_checkpointing=true", logs=tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert sorted(p.name for p in (store / "runs/syn").glob("step-*")) == ["step-000008", "step-000012"]
    assert_close(log(store), log(two))
    assert not list(store.glob(".shared-check-*"))  # the probe file is gone


@pytest.mark.slow
def test_two_nodes_with_separate_stores_are_refused_before_training(tmp_path):
    results = two_nodes([tmp_path / "a", tmp_path / "b"], logs=tmp_path)
    assert all(code != 0 for code, _ in results)
    text = results[0][1] + results[1][1]
    assert "the store is not one filesystem shared by every process: rank 1 on" in text
    assert str(tmp_path / "a") in text and str(tmp_path / "b") in text  # both paths: the mismatch shows
    assert "--store DIR or $LLMSTAGES_STORE" in text
    assert not (tmp_path / "a" / "runs" / "syn").exists() or not list((tmp_path / "a/runs/syn").glob("step-*"))


@pytest.mark.slow
def test_fsdp_with_lora_on_a_classifier_keeps_the_base_frozen(tmp_path):
    """classify task (class head at the last token), LoRA adapters, samples at each eval on rank 0, and
    adversarial training (two forwards of the sharded model per micro-batch, a gradient at its embeddings)."""
    args = ["--classify", "--sample", "finetune.trainable=lora", "finetune.lora_rank=2", "finetune.adversarial_eps=0.5"]
    single, sharded = launch(tmp_path / "one", *args), launch(tmp_path / "two", *args, procs=2)
    assert single.returncode == 0, single.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert_close(log(tmp_path / "two"), log(tmp_path / "one"))
    assert [r["sample"] for r in log(tmp_path / "two") if "sample" in r]  # on_eval ran on a gathered copy

    path = Store(tmp_path / "two").latest("syn")
    trained = load_checkpoint(str(path)).model.state_dict()
    config = read_model_config(path / "model.json")
    torch.manual_seed(0)  # the script builds its model after this seed: the base weights it started from
    start = GPT(config).state_dict()
    frozen = [k for k in start if "lora_" not in k and not k.startswith("score")]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert not all(torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)  # adapters trained


# --- in one process ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,lora", [("gpt2", False), ("modern", True)])
def test_activation_checkpointing_gives_the_same_gradients(arch, lora):
    extra = {} if arch == "gpt2" else dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16, dropout=0.2, **extra)

    def grads(on: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(config)
        if lora:
            add_lora(model, 2, 4.0, 0.1, ["c_attn", "c_fc"])
        set_activation_checkpointing(model, on)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)  # the same dropout masks both ways: the recompute replays the RNG
        model(x, targets=x).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_activation_checkpointing_keeps_fewer_activations():
    """Saved-for-backward bytes of one forward, measured by autograd's pack hook."""
    config = GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=2, n_embd=32)

    def saved_bytes(on: bool) -> int:
        model = GPT(config)
        set_activation_checkpointing(model, on)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        x = torch.randint(0, 64, (4, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, targets=x)
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_dry_run_estimate_follows_strategy_precision_and_checkpointing():
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64))
    shape, layers = (8, 64), 4
    one = memory_estimate(model, shape, "fp32", layers)
    ddp = memory_estimate(model, shape, "fp32", layers, strategy="ddp", world_size=4)
    fsdp = memory_estimate(model, shape, "fp32", layers, strategy="fsdp", world_size=4)
    bf16 = memory_estimate(model, shape, "bf16", layers, strategy="fsdp", world_size=4)
    ckpt = memory_estimate(model, shape, "fp32", layers, strategy="fsdp", world_size=4, checkpointing=True)
    assert ddp["ddp buckets"] == ddp["gradients"] == one["gradients"]  # DDP: everything whole, plus buckets
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == pytest.approx(one[part] / 4)
    assert 0 < bf16["gathered weights"] < fsdp["gathered weights"] < one["weights"]
    assert bf16["activations"] < fsdp["activations"]
    assert ckpt["activations"] < fsdp["activations"] and ckpt["weights"] == fsdp["weights"]
    assert sum(fsdp.values()) < sum(ddp.values())


def test_fsdp_refuses_muon_and_rollback():
    with pytest.raises(UserError) as err:
        build_recipe({"train": {"strategy": "fsdp", "optimizer": "muon", "spike": "rollback"}})
    assert "Muon orthogonalises whole matrices" in str(err.value) and "rollback is not supported" in str(err.value)
    assert build_recipe({"train": {"strategy": "fsdp", "activation_checkpointing": True}}).train.strategy == "fsdp"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_optimizer_index_that_asks_for_code_is_refused(tmp_path):
    """DCP writes its index with pickle: reading it back must not run what a hostile file asks for."""
    import torch.distributed.checkpoint as dcp

    from llmstages.fsdp import read_optimizer_files

    dcp.save({"optimizer": {"m": torch.ones(3)}}, checkpoint_id=tmp_path / "optimizer", no_dist=True)
    assert torch.equal(read_optimizer_files(tmp_path)["optimizer"]["m"], torch.ones(3))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (tmp_path / "optimizer" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="the checkpoint index asks for posix.system"):
        read_optimizer_files(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_instruct_finetune_through_the_cli_with_fsdp(tmp_path, data_file):
    """The instruct stage as users run it (rank 0 prepares the data, samples at each eval): torchrun with
    2 processes logs the 1-process losses. (Full fine-tuning: the stage draws LoRA's initial adapters
    from an unseeded RNG, so LoRA runs differ between processes; LoRA under fsdp is tested above.)"""
    from llmstages.checkpoint import save_checkpoint
    from llmstages.templates import format_prompt
    from llmstages.tokenizer import train_bpe

    source = data_file("instruction-data.json")
    records = json.loads(source.read_text())[:300]
    tok = train_bpe([format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in records], 512)
    for name in ("one", "two"):
        torch.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32))
        save_checkpoint(Store(tmp_path / name), "base", 1, base, tok, {"task": "pretrain"})
    args = ["finetune", "--task", "instruct", "init_from=base", "run=inst", "train.epochs=0", "train.max_steps=4",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_every=2", "train.eval_batches=2",
            "train.warmup_steps=1", "train.log_every=1", "train.precision=fp32", "finetune.eval_samples=1",
            "train.strategy=fsdp"]
    env = dict(ENV, LLMSTAGES_DATA=str(source.parent))
    single = subprocess.run([sys.executable, "-m", "llmstages", "--store", str(tmp_path / "one"), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                             str(next(_ports)), "-m", "llmstages", "--store", str(tmp_path / "two"), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = log(tmp_path / "one", "inst"), log(tmp_path / "two", "inst")
    assert_close(two, one, tokens=False)
    assert all(len(r["samples"]) == 1 for r in two if "val_loss" in r)
    assert verify_checkpoint(Store(tmp_path / "two").latest("inst")) == []


@pytest.mark.slow
def test_fsdp_in_bf16_trains_close_to_fp32(tmp_path, two):
    """MixedPrecisionPolicy: bf16 gathered weights and compute, fp32 gradient averaging and masters."""
    result = launch(tmp_path, "train.precision=bf16", procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 on cpu x 2 processes (fsdp)" in result.stderr
    bf16 = [r["loss"] for r in log(tmp_path) if "loss" in r]
    fp32 = [r["loss"] for r in log(two) if "loss" in r]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_the_optimizer_state_round_trips_through_dcp_in_one_process(tmp_path):
    """save_optimizer / load_optimizer without a process group (an fsdp run on one process, or a resume
    on one process): the same state back, this recipe's base_lr kept, the saved lr restored."""
    from llmstages.fsdp import load_optimizer, save_optimizer
    from llmstages.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    cfg = build_recipe({"train": {"lr": 1e-2, "min_lr": 1e-3}}).train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    save_optimizer(tmp_path, model, opt)

    again = build_optimizer(model, build_recipe({"train": {"lr": 5e-3, "min_lr": 1e-3}}).train, torch.device("cpu"))
    load_optimizer(tmp_path, model, again)
    before, after = opt.state_dict()["adamw"], again.state_dict()["adamw"]
    assert before["state"].keys() == after["state"].keys() and len(before["state"]) > 0
    for key, state in before["state"].items():
        assert all(torch.equal(state[name], after["state"][key][name]) for name in ("step", "exp_avg", "exp_avg_sq"))
    assert [g["base_lr"] for g in again.param_groups] == [5e-3, 5e-3]  # the new recipe's, as after --allow-change

    (tmp_path / "optimizer" / "__0_0.distcp").write_bytes(b"truncated")
    with pytest.raises(UserError, match="the sharded optimizer state does not load"):
        load_optimizer(tmp_path, model, build_optimizer(model, cfg, torch.device("cpu")))


def test_dry_run_reports_per_process_memory_for_the_launch_it_plans(monkeypatch):
    """`WORLD_SIZE=N llmstages ... --dry-run` (or the dry run under torchrun): figures per process."""
    from io import StringIO

    from rich.console import Console

    from llmstages.dryrun import estimate
    from llmstages.loop import TrainTask
    from llmstages.objectives import lm_loss

    model = GPT(GPTConfig(vocab_size=4096, block_size=16, n_layer=2, n_head=2, n_embd=64))  # ~1 MiB embedding
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "targets": torch.zeros(2, 16, dtype=torch.long),
             "n_tokens": 32}
    task = TrainTask("pretrain", lambda i: batch, lm_loss, lambda m: {}, "x")
    recipe = build_recipe({"train": {"strategy": "fsdp", "activation_checkpointing": True, "micro_batch_size": 2,
                                     "global_batch_size": 8, "max_steps": 3, "device": "cpu", "precision": "fp32"}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    figures = estimate(model, recipe, task, Console(file=StringIO(), width=200))
    assert figures["processes"] == 2 and figures["strategy"] == "fsdp" and figures["activation checkpointing"] is True
    assert figures["micro-batches per step"] == 2  # 8 = 2 per micro-batch x 2 micro-batches x 2 processes
    assert figures["estimated gathered weights (MiB)"] > 0 and "estimated ddp buckets (MiB)" not in figures
    assert all(block.checkpointing for block in model.transformer.h)  # measured as it will run
