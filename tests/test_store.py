"""The store: atomic checkpoints, manifests, kill safety, pruning, lookup, safe loading."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llmstages.checkpoint import lineage, load_checkpoint, load_train_state, save_checkpoint, write_train_state
from llmstages.errors import UserError
from llmstages.model import GPT, GPTConfig
from llmstages.store import Store, is_committed, verify
from llmstages.tokenizer import train_bpe

CONFIG = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 300)


def model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG, **kw))


def test_saved_and_reloaded_checkpoint_gives_bit_identical_logits(tmp_path, tokenizer):
    store = Store(tmp_path)
    original = model()
    path = save_checkpoint(store, "r", 10, original, tokenizer, {"task": "pretrain"})
    assert sorted(p.name for p in path.iterdir()) == ["MANIFEST", "meta.json", "model.json", "model.safetensors",
                                                     "tokenizer.json"]
    loaded = load_checkpoint("r", store)
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(original.eval()(idx), loaded.model.eval()(idx))
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert loaded.meta["step"] == 10 and loaded.meta["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint


def test_classifier_and_lora_checkpoints_round_trip(tmp_path, tokenizer):
    store = Store(tmp_path)
    clf = model(num_classes=2, class_names=["ham", "spam"], lora_rank=2, lora_targets=["c_attn"])
    save_checkpoint(store, "c", 1, clf, tokenizer, {"task": "classify"})
    loaded = load_checkpoint("c", store).model
    idx = torch.randint(0, 300, (2, 16))
    assert loaded.config.class_names == ["ham", "spam"]
    assert torch.equal(clf.eval()(idx, last_index=torch.tensor([15, 3])),
                       loaded.eval()(idx, last_index=torch.tensor([15, 3])))


def test_latest_best_prune_and_references(tmp_path, tokenizer):
    store = Store(tmp_path)
    m = model()
    for step in (100, 200, 300, 400):
        save_checkpoint(store, "r", step, m, tokenizer, {"task": "pretrain"})
        if step == 200:
            store.set_best("r", 200, "val_loss", 1.5)
        store.prune("r", keep_last=2)
    assert [p.name for p in store.checkpoints("r")] == ["step-000200", "step-000300", "step-000400"]
    assert store.latest("r").name == "step-000400"
    assert store.resolve("r").name == "step-000200"  # a run name means its best checkpoint
    assert store.resolve("r@latest").name == "step-000400"
    assert store.resolve("r@300").name == "step-000300"
    assert store.resolve(str(store.run_dir("r"))).name == "step-000200"
    with pytest.raises(UserError, match="no run named 'x'"):
        store.resolve("x")
    with pytest.raises(UserError, match="no committed checkpoint at step 100") as err:
        store.resolve("r@100")  # pruned: the message lists the steps that exist
    assert "its checkpoints are at steps 200, 300, 400" in err.value.hint


def test_corruption_is_detected(tmp_path, tokenizer):
    store = Store(tmp_path)
    path = save_checkpoint(store, "r", 1, model(), tokenizer, {})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (path / "model.safetensors").write_bytes(bytes(data))
    assert is_committed(path)  # the fast check sees sizes only
    assert verify(path) == [f"{path / 'model.safetensors'}: contents do not match MANIFEST (corrupted or modified)"]
    with pytest.raises(UserError, match=f"{path / 'model.safetensors'}: contents do not match MANIFEST"):
        load_checkpoint("r", store)


def test_folder_without_manifest_does_not_exist_for_readers(tmp_path, tokenizer):
    store = Store(tmp_path)
    save_checkpoint(store, "r", 1, model(), tokenizer, {})
    fake = store.run_dir("r") / "step-000002"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")
    assert store.latest("r").name == "step-000001"
    with pytest.raises(UserError, match="not a committed checkpoint"):
        store.resolve(str(fake))


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from llmstages.checkpoint import save_checkpoint, write_model_files
    from llmstages.model import GPT, GPTConfig
    from llmstages.store import Store
    from llmstages.tokenizer import train_bpe
    store = Store(sys.argv[1])
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 300)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(store, "r", 1, m, tok, {"task": "pretrain"})
    with store.commit("r", 2) as tmp:
        write_model_files(tmp, m, tok, {"task": "pretrain"})
        print("WRITING", flush=True)
        time.sleep(60)  # the parent kills us here, mid-checkpoint
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    store = Store(tmp_path)
    assert [p.name for p in store.checkpoints("r")] == ["step-000001"]
    ckpt = load_checkpoint("r", store)
    assert ckpt.meta["step"] == 1
    if sig == signal.SIGKILL:  # a kill leaves its temporary folder out of sight, until the next run cleans it
        assert any(p.name.startswith(".tmp-step-000002") for p in store.run_dir("r").iterdir())
    store.clean_partial("r")
    assert sorted(p.name for p in store.run_dir("r").iterdir()) == ["step-000001"]


def test_train_state_loads_without_executing_code(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    write_train_state(folder, {"optimizer": {"lr": torch.tensor(1.0)}}, {"step": 3})
    tensors, info = load_train_state(folder)
    assert info["step"] == 3 and tensors["optimizer"]["lr"].item() == 1.0

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, folder / "train_state.pt")
    with pytest.raises(UserError) as err:  # our message naming the file, not torch's exception
        load_train_state(folder)
    assert str(err.value).startswith(f"{folder / 'train_state.pt'}: refused: not plain tensor data")
    assert "weights_only=False" not in str(err.value) + (err.value.hint or "")  # no advice to run the file's code
    assert not (tmp_path / "pwned").exists()
    (folder / "train_state.pt").write_bytes(b"not a torch file")  # plain corruption: the same clear error
    with pytest.raises(UserError, match="train_state.pt: refused: not plain tensor data .*unreadable or truncated"):
        load_train_state(folder)


def test_lineage_follows_parents(tmp_path, tokenizer):
    store = Store(tmp_path)
    base = save_checkpoint(store, "base", 5, model(), tokenizer, {"task": "pretrain"})
    child = save_checkpoint(store, "ft", 7, model(), tokenizer,
                            {"task": "classify", "parent": {"ref": "base", "path": str(base)}})
    chain = lineage(child, store)
    assert [(c["task"], c["step"]) for c in chain] == [("classify", 7), ("pretrain", 5)]
    assert json.loads((child / "meta.json").read_text())["parent"]["ref"] == "base"
