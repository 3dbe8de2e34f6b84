"""Hostile and broken input, one test per hole of issue 15 (points 5-9): each failed before its fix.

Weights are checked before they are loaded, every corrupt file is exit 2 naming it, --json is strict
JSON, run names are checked wherever they come from, a fine-tune refuses what it cannot honour before
it writes anything, recipe problems come in one pass, and the small CLI holes stay closed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from llmstages.checkpoint import load_checkpoint, load_train_state, save_checkpoint, write_train_state
from llmstages.config import build_recipe, load_recipe
from llmstages.data.prepared import PreparedDataset
from llmstages.errors import RecipeError, UserError
from llmstages.interop import export_hf
from llmstages.model import GPT, GPTConfig
from llmstages.store import Store, write_manifest
from llmstages.tokenizer import Tokenizer, train_bpe

CONFIG = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as every other JSON parser does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 300)


@pytest.fixture
def store(tmp_path, tokenizer):
    """A store with run 'r' holding one committed checkpoint of a tiny model."""
    torch.manual_seed(0)
    store = Store(tmp_path / "store")
    save_checkpoint(store, "r", 1, GPT(GPTConfig(**CONFIG)), tokenizer, {"task": "pretrain"})
    return store


def ckpt_dir(store: Store) -> Path:
    return store.run_dir("r") / "step-000001"


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace one file of a committed folder and re-sign its MANIFEST (a hostile or hand-made checkpoint)."""
    (folder / name).write_bytes(data)
    (folder / "MANIFEST").unlink()
    write_manifest(folder)


def poison(path: Path, tensor: str) -> None:
    state = load_file(str(path))
    state[tensor][0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# point 5: weights and the files beside them
# ---------------------------------------------------------------------------------------------------
def test_nan_weights_in_a_checkpoint_are_refused_naming_the_tensor(store):
    folder = ckpt_dir(store)
    poison(folder / "model.safetensors", "transformer.ln_f.weight")
    rewrite(folder, "model.safetensors", (folder / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"NaN or inf: transformer\.ln_f\.weight"):
        load_checkpoint("r", store)


def test_nan_weights_in_an_hf_folder_are_refused(store, tmp_path):
    out = export_hf(load_checkpoint("r", store), tmp_path / "hf", force=False)
    poison(out / "model.safetensors", "transformer.h.0.attn.c_attn.weight")
    with pytest.raises(UserError, match=r"NaN or inf: transformer\.h\.0\.attn\.c_attn\.weight"):
        load_checkpoint(f"hf:{out}")


def test_a_tensor_of_the_wrong_shape_is_named(store):
    folder = ckpt_dir(store)
    config = json.loads((folder / "model.json").read_text())
    rewrite(folder, "model.json", json.dumps(dict(config, n_embd=32)).encode())
    with pytest.raises(UserError, match=r"transformer\.wte\.weight has shape \[300, 16\], the config says \[300, 32\]"):
        load_checkpoint("r", store)


def test_an_absurd_model_json_is_refused_before_anything_is_allocated(store):
    folder = ckpt_dir(store)
    config = json.loads((folder / "model.json").read_text())
    rewrite(folder, "model.json", json.dumps(dict(config, n_layer=10**9, n_embd="16")).encode())
    with pytest.raises(UserError, match=r"n_layer: 1000000000 is outside.*\n.*n_embd: expected an integer"):
        load_checkpoint("r", store)


@pytest.mark.parametrize("name", ["model.json", "meta.json"])
def test_a_corrupt_json_file_of_a_checkpoint_is_exit_2_naming_it(store, name):
    folder = ckpt_dir(store)
    size = (folder / name).stat().st_size
    rewrite(folder, name, b"x" * size)  # same size, not JSON
    with pytest.raises(UserError, match=rf"{name}: corrupt"):
        load_checkpoint("r", store)


def test_show_of_a_same_size_corrupt_model_json_is_exit_2(store):
    path = ckpt_dir(store) / "model.json"
    path.write_bytes(b"x" + path.read_bytes()[1:])  # `show` reads it without checking hashes
    result = run_cli("--store", str(store.root), "show", "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}: corrupt" in result.stderr.replace("\n", "")


def test_a_corrupt_dataset_manifest_is_exit_2_naming_it(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "task": "pretrain", "dtype": "uint16",
                                                      "splits": {"train": {"shards": ["../../etc/passwd"]}}}))
    write_manifest(folder)
    with pytest.raises(UserError, match=r"manifest.json: corrupt dataset manifest"):
        PreparedDataset.open(folder)
    rewrite(folder, "manifest.json", b"[1, 2]")
    with pytest.raises(UserError, match=r"manifest.json: corrupt dataset manifest: expected a JSON object"):
        PreparedDataset.open(folder)


def test_a_garbage_manifest_makes_the_checkpoint_invisible(store):
    (ckpt_dir(store) / "MANIFEST").write_bytes(os.urandom(200))
    with pytest.raises(UserError, match="no committed checkpoint"):
        load_checkpoint("r", store)


def test_show_json_is_strict_json_when_a_metric_is_nan(tmp_path, tokenizer):
    store = Store(tmp_path / "store")
    save_checkpoint(store, "r", 1, GPT(GPTConfig(**CONFIG)), tokenizer,
                    {"task": "pretrain", "metrics": {"val_loss": float("nan"), "loss": float("inf")}})
    result = run_cli("--store", str(store.root), "show", "r", "--json")
    assert result.returncode == 0, result.stderr
    data = strict_json(result.stdout)
    assert data["lineage"][0]["metrics"] == {"val_loss": None, "loss": None}


# ---------------------------------------------------------------------------------------------------
# point 6: run names
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_name", ["...yaml", "..yaml", "my run.yaml"])
def test_a_run_name_from_the_recipe_file_name_is_checked(tmp_path, file_name):
    path = tmp_path / file_name
    path.write_text("train:\n  max_steps: 1\n")
    with pytest.raises(RecipeError, match="run: the recipe file's name gives the run name"):
        load_recipe(path)


@pytest.mark.parametrize("override", ["run=..", "run=.", "run=a/b", "data.name=../x"])
def test_a_run_or_dataset_name_override_that_leaves_the_store_is_refused(override):
    with pytest.raises(RecipeError, match="use letters, digits"):
        build_recipe({}, [override])


# ---------------------------------------------------------------------------------------------------
# point 7: what a fine-tune cannot honour, refused before anything is written
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def finetune_setup(tmp_path, gpt2_tokenizer_dir):
    """A 64-token base 'base' (GPT-2 tokenizer) and an instruction recipe that fine-tunes it."""
    store = Store(tmp_path / "store")
    tok = Tokenizer.from_file(gpt2_tokenizer_dir)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(store, "base", 1, base, tok, {"task": "pretrain"})
    rows = [{"instruction": f"Say {w} twice", "input": "", "output": f"{w} {w}"} for w in "red green blue cat".split()]
    (tmp_path / "ins.json").write_text(json.dumps(rows * 5))
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"task: instruct\ninit_from: base\ndata:\n  source: [{tmp_path / 'ins.json'}]\n"
                      "train:\n  max_steps: 1\n  micro_batch_size: 2\n  global_batch_size: 2\n")
    return store, recipe


def test_a_fine_tune_context_beyond_its_base_is_refused(finetune_setup):
    store, recipe = finetune_setup
    result = run_cli("--store", str(store.root), "finetune", str(recipe), "model.block_size=4096", "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "model.block_size=4096" in result.stderr and "64 tokens" in result.stderr
    assert not (store.root / "data").exists()


def test_a_fine_tune_tokenizer_refusal_writes_nothing(finetune_setup):
    store, recipe = finetune_setup
    result = run_cli("--store", str(store.root), "finetune", str(recipe), "data.tokenizer=train",
                     "data.vocab_size=300")
    assert result.returncode == 2, result.stderr
    assert "nothing was prepared" in result.stderr
    assert not (store.root / "data").exists()  # before the fix: a prepared dataset was left behind


# ---------------------------------------------------------------------------------------------------
# point 8: every recipe problem in one pass
# ---------------------------------------------------------------------------------------------------
def test_field_and_cross_field_problems_are_reported_together():
    raw = {"trian": {}, "train": {"lr": 1e-4, "min_lr": 1e-3, "micro_batch_size": 3, "global_batch_size": 8}}
    with pytest.raises(RecipeError) as err:
        build_recipe(raw, ["run=.."])
    assert [path for path, _ in err.value.problems] == ["trian", "train.global_batch_size", "train.min_lr", "run"]


def test_a_cross_check_on_a_field_with_its_own_problem_is_skipped():
    with pytest.raises(RecipeError) as err:  # micro_batch_size=0 must not also crash the batch-multiple check
        build_recipe({"train": {"micro_batch_size": 0, "lr": "fast"}})
    assert sorted(path for path, _ in err.value.problems) == ["train.lr", "train.micro_batch_size"]


# ---------------------------------------------------------------------------------------------------
# point 9: the smaller ones
# ---------------------------------------------------------------------------------------------------
def test_a_malicious_train_state_is_refused_without_torch_advice(tmp_path):
    write_train_state(tmp_path, {}, {"step": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "train_state.pt")
    with pytest.raises(UserError) as err:
        load_train_state(tmp_path)
    assert "refused: not plain tensor data" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_the_resume_command_after_a_stop_is_one_line_in_a_pipe(tmp_path):
    script = Path(__file__).parent / "scripts" / "train_synthetic.py"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    extra = ["train.seed=1337", "train.eval_batches=20", "train.keep_last=2", "train.weight_decay=0.1"]
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "30", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 5"):
            break
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out
    lines = out.splitlines()
    command = lines[lines.index(next(x for x in lines if x.endswith("Resume with:"))) + 1]
    assert command.strip().endswith("train.weight_decay=0.1 --resume"), out  # before: cut at 80 columns


def test_evaluate_reads_a_json_file_as_json_for_a_model_trained_on_tsv(tmp_path, tokenizer):
    store = Store(tmp_path / "store")
    clf = GPT(GPTConfig(**CONFIG, num_classes=2, class_names=["ham", "spam"]))
    save_checkpoint(store, "clf", 1, clf, tokenizer, {"task": "classify",
                                                      "data_settings": {"format": "tsv", "columns": ["label", "text"]}})
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"label": "ham", "text": "the dog"}, {"label": "spam", "text": "the fox"}]))
    result = run_cli("--store", str(store.root), "evaluate", "clf", "--data", str(held), "--json")
    assert result.returncode == 0, result.stderr
    assert strict_json(result.stdout)["examples"] == 2


def test_generate_into_a_closed_pipe_exits_0_quietly(store):
    proc = subprocess.Popen([sys.executable, "-m", "llmstages", "--store", str(store.root), "generate", "r", "the",
                             "-n", "2000", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.read(1)
    proc.stdout.close()  # as `| head -c 1` does
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------------------------------------------
# points 1-4: verified resume, finite checkpoints, loss spikes, a full disk (tests/scripts/train_synthetic.py)
# ---------------------------------------------------------------------------------------------------
SCRIPT = Path(__file__).parent / "scripts" / "train_synthetic.py"
SYN_ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def synthetic(store: Path, steps: int, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """train_synthetic.py in a subprocess; `prelude` is Python run first in that process (to fake a full disk)."""
    code = (f"import runpy, sys\n{prelude}\nsys.argv = {[str(SCRIPT), str(store), str(steps), *args]!r}\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SYN_ENV, timeout=300)


def syn_checkpoints(store: Path) -> list[Path]:
    return sorted((store / "runs" / "syn").glob("step-*"))


def all_verify(store: Path) -> list[str]:
    from llmstages.checkpoint import verify_checkpoint
    return [problem for path in syn_checkpoints(store) for problem in verify_checkpoint(path)]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """An uninterrupted 6-step run with a checkpoint every 2 steps (the reference of the resume tests)."""
    store = tmp_path_factory.mktemp("six")
    result = synthetic(store, 6, "train.save_every=2", "train.keep_last=5")
    assert result.returncode == 0, result.stderr
    return store


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt"])
def test_resume_skips_a_corrupted_checkpoint_and_never_launders_it(tmp_path, six_steps, name):
    """Point 1: before the fix --resume trained on from the flipped byte and committed it under a valid MANIFEST."""
    store = tmp_path / "store"
    shutil.copytree(six_steps, store)
    flip_byte(store / "runs/syn/step-000006" / name)
    result = synthetic(store, 6, "--resume", "train.save_every=2", "train.keep_last=5")
    assert result.returncode == 0, result.stderr
    assert "skipping step-000006 of syn" in result.stderr and f"step-000006/{name}" in result.stderr
    assert "resuming at step 4" in result.stderr
    assert all_verify(store) == []
    # step 6 was trained again from step 4: the uninterrupted run's weights exactly
    new, ref = (load_file(str(s / "runs/syn/step-000006/model.safetensors")) for s in (store, six_steps))
    assert all(torch.equal(new[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_resume_with_no_checkpoint_that_verifies_is_a_clear_error(tmp_path, six_steps):
    store = tmp_path / "store"
    shutil.copytree(six_steps, store)
    for path in syn_checkpoints(store):
        flip_byte(path / "model.safetensors")
    result = synthetic(store, 6, "--resume", "train.save_every=2", "train.keep_last=5")
    assert result.returncode == 2, result.stderr
    assert "no checkpoint of run 'syn' verifies" in result.stderr and "Traceback" not in result.stderr


def test_verify_command_reports_each_bad_file(tmp_path, six_steps, cli):
    store = tmp_path / "store"
    shutil.copytree(six_steps, store)
    good = cli("--store", str(store), "verify")
    assert good.returncode == 0 and "3 folders checked, 0 bad" in good.stdout, good.stdout + good.stderr
    flip_byte(store / "runs/syn/step-000002/model.safetensors")
    poison(store / "runs/syn/step-000004/model.safetensors", "transformer.ln_f.weight")
    (store / "runs/syn/step-000004/MANIFEST").unlink()
    write_manifest(store / "runs/syn/step-000004")  # a re-signed NaN checkpoint: the sha256 alone passes it
    bad = cli("--store", str(store), "verify", "syn")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    out = " ".join(bad.stdout.split())
    assert "BAD syn/step-000002" in out and "step-000002/model.safetensors: contents do not match" in out
    assert "BAD syn/step-000004" in out and "transformer.ln_f.weight" in out
    assert "ok syn/step-000006" in out and "3 folders checked, 2 bad" in out
    missing = cli("--store", str(store), "verify", "nosuchrun")
    assert missing.returncode == 2 and "no run 'nosuchrun'" in missing.stderr


@pytest.mark.slow
def test_non_finite_weights_are_never_committed(tmp_path):
    """Point 2: the loss stays finite while the update makes the weights NaN; before the fix step-000004
    was committed full of NaN and named 'the last good checkpoint'."""
    result = synthetic(tmp_path, 10, "--nan-grad-at", "3", "train.save_every=1", "train.keep_last=10")
    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert "became non-finite" in message and "not saved" in message
    assert "the last finite checkpoint is" in message and message.split("last finite checkpoint is ")[1].startswith(
        str(tmp_path / "runs/syn/step-000003"))
    assert [p.name for p in syn_checkpoints(tmp_path)] == ["step-000001", "step-000002", "step-000003"]
    assert all_verify(tmp_path) == []


@pytest.mark.slow
def test_the_issues_lr_and_weight_decay_leave_only_finite_checkpoints(tmp_path):
    """Point 2 as reported: lr=1.0 weight_decay=1000 save_every=1; whatever step it stops at, every
    committed checkpoint verifies (finite weights and optimizer state)."""
    result = synthetic(tmp_path, 10, "train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=0",
                       "train.weight_decay=1000", "train.save_every=1", "train.keep_last=10")
    assert result.returncode == 1 and "non-finite" in result.stderr, result.stderr
    assert syn_checkpoints(tmp_path) and all_verify(tmp_path) == []


def syn_log(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "runs/syn/log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_loss_spike_warns_by_default(tmp_path):
    """Point 3: with lr=1.0 and no clipping the loss jumps ~5x; before the fix nothing was said."""
    result = synthetic(tmp_path, 8, "train.lr=1.0", "train.min_lr=0.1", "train.grad_clip=0")
    assert result.returncode == 0, result.stderr
    assert "loss spike at step 3" in " ".join(result.stderr.split())
    assert any(r.get("spike") for r in syn_log(tmp_path))


@pytest.mark.slow
def test_spike_skip_drops_the_update_and_stops_after_k_in_a_row(tmp_path):
    one = synthetic(tmp_path / "one", 8, "--spike-at", "4", "train.spike=skip", "train.save_every=4")
    assert one.returncode == 0, one.stderr
    assert "update skipped (1 so far)" in " ".join(one.stderr.split())
    assert any(r.get("skipped") == 1 for r in syn_log(tmp_path / "one"))  # counted in the log
    info = json.loads((tmp_path / "one/runs/syn/step-000008/train_state.json").read_text())
    assert info["spikes"]["skipped"] == 1  # in RunState: a resumed run knows it
    many = synthetic(tmp_path / "many", 12, "train.lr=1.0", "train.min_lr=0.1", "train.grad_clip=0",
                     "train.spike=skip", "train.spike_max=3")
    assert many.returncode == 1 and "3 loss spikes in a row" in many.stderr, many.stderr


@pytest.mark.slow
def test_spike_rollback_returns_to_the_checkpoint_and_skips_the_bad_batch(tmp_path):
    result = synthetic(tmp_path, 12, "--spike-at", "7", "train.spike=rollback", "train.save_every=2",
                       "train.log_every=1")
    assert result.returncode == 0, result.stderr
    assert "rolled back to step-000006" in " ".join(result.stderr.split())
    steps = [r["step"] for r in syn_log(tmp_path) if r.get("loss") is not None]
    assert steps == sorted(set(steps)) and 8 not in steps  # step 8 was skipped; no duplicate of a replayed step
    info = json.loads((tmp_path / "runs/syn/step-000012/train_state.json").read_text())
    assert info["spikes"]["skip_steps"] == [8]
    assert all_verify(tmp_path) == []


FULL_DISK = "import os, collections\nos.statvfs = lambda p: collections.namedtuple('s', 'f_bavail f_frsize')(10, 4096)"
ENOSPC_ON_SECOND = """
import errno, llmstages.checkpoint as ck
real, calls = ck.save_file, []
def save_file(state, path, **kw):
    calls.append(path)
    if len(calls) == 2:
        open(path, 'wb').write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device', path)
    return real(state, path, **kw)
ck.save_file = save_file
"""


@pytest.mark.slow
def test_a_store_without_room_for_two_checkpoints_is_refused_before_step_1(tmp_path):
    result = synthetic(tmp_path, 4, prelude=FULL_DISK)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "40,960 bytes free" in message and str(tmp_path / "runs/syn") in message and "bytes" in message
    assert "step 1 " not in result.stdout + result.stderr and not syn_checkpoints(tmp_path)


@pytest.mark.slow
def test_disk_full_mid_write_is_exit_3_removes_the_temp_folder_and_prunes_nothing(tmp_path):
    """Point 4: before the fix a raw SafetensorError/OSError traceback with exit 1."""
    result = synthetic(tmp_path, 6, "train.save_every=2", "train.keep_last=1", prelude=ENOSPC_ON_SECOND)
    assert result.returncode == 3, result.stderr
    assert "no space left" in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "runs/syn"
    assert [p.name for p in run_dir.iterdir() if p.name.startswith((".tmp", "step-"))] == ["step-000002"]
    assert all_verify(tmp_path) == []


def test_prepare_on_a_full_disk_is_a_clear_error(tmp_path, store_dir, monkeypatch, capsys):
    import errno

    import llmstages.store as store_module
    from llmstages.cli import main

    (tmp_path / "docs.txt").write_text("".join(f"Document number {i}.\n<|endoftext|>\n" for i in range(30)))
    (tmp_path / "r.yaml").write_text("task: pretrain\ndata:\n  source: [docs.txt]\n  delimiter: <|endoftext|>\n")

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "MANIFEST"))

    monkeypatch.setattr(store_module, "write_manifest", full)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "r.yaml", "data.vocab_size=300"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on the device writing" in err and "MANIFEST" in err


# The property of the issue: random SIGKILLs never leave a store that fails to verify, and the run ends
# with the weights of an uninterrupted one. LLMSTAGES_KILLS bounds the number of kills (CI: the default).
KILLS = int(os.environ.get("LLMSTAGES_KILLS", "10"))


@pytest.mark.slow
def test_random_sigkills_leave_a_verifying_store_and_the_same_final_weights(tmp_path):
    import random
    import time

    from llmstages.store import Store

    # a rollback on the way (spike at step 8) and keep_last pruning: the paths a kill can interrupt
    args = ["--spike-at", "7", "train.spike=rollback", "train.save_every=2", "train.keep_last=2", "train.log_every=1"]
    ref = synthetic(tmp_path / "ref", 60, *args)
    assert ref.returncode == 0, ref.stderr
    store, rng, kills = tmp_path / "killed", random.Random(15), 0

    def latest_step() -> int:
        found = Store(store).checkpoints("syn")
        return int(found[-1].name.split("-")[1]) if found else 0

    # Kills are placed by the run's progress, not by the clock (a fast machine finished the run before a
    # clock-timed third kill): now and then during startup, else a random 0-150 ms after the run has
    # committed a checkpoint 2 to 8 steps past where it resumed, so they land mid-step, mid-save or
    # mid-pruning. Kills stop at step 50, so the resumed run always has steps left.
    while kills < KILLS and (resumed_at := latest_step()) < 50:
        flag = ["--resume"] if resumed_at else []
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(store), "60", *args, *flag],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SYN_ENV)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.1, 1.5))
        else:
            target, deadline = min(resumed_at + 2 * rng.randint(1, 4), 50), time.monotonic() + 120
            while latest_step() < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:  # finished first (a slow poll near the end): nothing left to kill
            assert proc.returncode == 0
            break
        proc.kill()
        proc.wait()
        kills += 1
        assert all_verify(store) == [], f"after kill {kills}"
    assert kills >= min(KILLS, 3)
    final = synthetic(store, 60, *args, *(["--resume"] if latest_step() else []))
    assert final.returncode == 0, final.stderr
    new, old = (load_file(str(s / "runs/syn/step-000060/model.safetensors")) for s in (store, tmp_path / "ref"))
    assert all(torch.equal(new[k], old[k]) for k in old)  # bit for bit
    assert all_verify(store) == []
