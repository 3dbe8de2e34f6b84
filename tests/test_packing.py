"""Packed instruction fine-tuning (finetune.packing): several examples per row, each attending only to
itself with its own positions; the loss of every example is the one it gets alone in a padded row.

Tiny models (1-2 layers, 32 wide) and random token examples; one in-process fine-tuning run on a
synthetic instruction file, and the same run resumed from its middle checkpoint.
"""

from __future__ import annotations

import json
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.config import build_recipe
from llmstages.data.batches import EpochSampler, Example, collate
from llmstages.data.packing import PackedBatches, collate_packed, epoch_padding, pack_rows, padding_share
from llmstages.errors import RecipeError
from llmstages.model import GPT, GPTConfig
from llmstages.objectives import IGNORE, lm_loss
from llmstages.stages.finetune import finetune
from llmstages.stages.instruct import report_padding
from llmstages.store import Store
from llmstages.templates import format_prompt
from llmstages.tokenizer import train_bpe

VOCAB = 97
ARCHS = {  # the position and attention variants packing must handle
    "gpt2": dict(arch="gpt2"),  # learned position table
    "modern": dict(arch="modern", pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False,
                   tie_embeddings=False, logit_softcap=15.0),  # rotary positions, soft-capped logits
    "gqa": dict(arch="modern", pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1),
}


def tiny_model(kind: str, block_size: int = 48) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **ARCHS[kind]))
    return model.eval()


def random_examples(n: int, seed: int = 0, longest: int = 14) -> list[Example]:
    """Examples of 3..longest tokens (prompt + response + eot), prompts of 1..half of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, longest + 1))
        prompt = int(rng.integers(1, length // 2 + 1))
        out.append(Example(rng.integers(1, VOCAB, size=length).astype(np.int64), prompt, i))
    return out


def token_losses(model: GPT, batch: dict) -> torch.Tensor:
    """Cross-entropy of every position (B, T), 0 where the target is IGNORE."""
    logits = model(batch["input_ids"], positions=batch.get("positions"), segments=batch.get("segments"))
    nats = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="none")
    return nats.view(batch["targets"].shape)


# --- packing rows --------------------------------------------------------------------------------------
def test_pack_rows_places_every_example_once_and_never_overfills():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 33, size=300)
    order = rng.permutation(300)
    for open_rows in (1, 4, 64):
        rows = pack_rows(lengths, order, 32, open_rows=open_rows)
        assert sorted(i for row in rows for i in row) == list(range(300))
        assert max(int(lengths[row].sum()) for row in rows) <= 32
        firsts = {row[0] for row in rows}
        assert [row[0] for row in rows] == [i for i in order if i in firsts]  # rows are started in order
    # next fit (one open row) needs more rows, so more padding, than first fit over 64 open rows
    assert len(pack_rows(lengths, order, 32, open_rows=64)) < len(pack_rows(lengths, order, 32, open_rows=1))
    assert pack_rows([3, 5, 2, 4, 1, 6], range(6), 6, open_rows=2) == [[0, 2], [1, 4], [3], [5]]
    with pytest.raises(ValueError, match="example 1 has 7 tokens"):
        pack_rows([3, 7], range(2), 6)


def test_collate_packed_restarts_positions_and_masks_each_prompt():
    a = Example(np.array([10, 11, 12, 20]), n_prompt=2)  # inputs 10 11 12, targets -- 12 20
    b = Example(np.array([13, 14, 21, 22, 0]), n_prompt=3)  # inputs 13 14 21 22, targets -- -- 22 0
    c = Example(np.array([15, 23, 0]), n_prompt=1)
    batch = collate_packed([[a, b], [c]], mask_prompt=True, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 21, 22], [15, 23, 0, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[IGNORE, 12, 20, IGNORE, IGNORE, 22, 0],
                                         [23, 0, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, -1, -1, -1, -1, -1]]
    assert batch["n_tokens"] == 9
    # the same targets as one example per row
    for example, row, start in ((a, 0, 0), (b, 0, 3), (c, 1, 0)):
        alone = collate([example], mask_prompt=True, pad_id=0)["targets"][0]
        assert batch["targets"][row, start:start + len(alone)].tolist() == alone.tolist()
    unmasked = collate_packed([[a, b]], mask_prompt=False, pad_id=0)
    assert unmasked["targets"][0].tolist() == [11, 12, 20, 14, 21, 22, 0]


def test_packed_batches_are_a_pure_function_of_the_index_and_cover_each_epoch():
    examples = random_examples(41, longest=20)
    make = lambda: PackedBatches(examples, 3, seed=5, block_size=24, mask_prompt=True, pad_id=0)  # noqa: E731
    a, b = make(), make()
    for index in (9, 0, 4, 30, 2):  # any order: a resumed run asks for batch g first
        assert all(torch.equal(a(index)[k], b(index)[k]) for k in ("input_ids", "targets", "positions", "segments"))
    per_epoch = a.rows_per_epoch
    stream = [a.row(p) for p in range(3 * per_epoch)]
    first = [i for row in stream[:per_epoch] for i in row]
    assert sorted(first) == list(range(41))
    # the examples come in the order the unpacked sampler draws for the same epoch (first fit may pull
    # a short one forward into an open row, so compare the order in which rows are started)
    order = EpochSampler(41, 3, 5).epoch_order(0).tolist()
    assert [row[0] for row in stream[:per_epoch]] == [i for i in order if i in {row[0] for row in stream[:per_epoch]}]
    assert max(sum(len(examples[i].ids) - 1 for i in row) for row in stream) <= 24
    second = a.epoch_rows(1)  # the next epoch follows in the stream (its row count may differ a little)
    assert stream[per_epoch:per_epoch + len(second)] == second
    assert sorted(i for row in second for i in row) == list(range(41))
    assert second != a.epoch_rows(0)  # a new order every epoch


def test_padding_share_counts_the_padded_positions():
    assert padding_share([[3, 1], [2, 2]]) == pytest.approx(2 / 10)
    lengths = [5, 1, 4, 2, 8, 8]
    figures = epoch_padding(lengths, 2, seed=0, block_size=8)
    assert figures["packed"] < figures["padded"] and figures["rows"] <= 4
    out = Console(file=StringIO(), width=300)
    examples = [Example(np.arange(n + 1), 1) for n in lengths]
    report_padding(out, examples, 2, 0, 8, packing=False)
    report_padding(out, examples, 2, 0, 8, packing=True)
    text = out.file.getvalue()
    assert f"{figures['padded']:.1%} of the positions are padding (finetune.packing=true: {figures['packed']:.1%})" in text
    assert f"6 examples packed into {figures['rows']} rows of up to 8 tokens: {figures['packed']:.1%}" in text


# --- the model on packed rows ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_packed_and_padded_rows_give_each_example_the_same_loss(kind):
    model = tiny_model(kind)
    examples = random_examples(12)
    padded = collate(examples, mask_prompt=True, pad_id=0)
    alone = token_losses(model, padded).sum(dim=1)  # (12,) summed response-token loss of each example
    rows = pack_rows([len(e.ids) - 1 for e in examples], range(12), 48)
    assert len(rows) < len(examples) and max(len(r) for r in rows) > 2  # real packing, several per row
    packed = collate_packed([[examples[i] for i in row] for row in rows], mask_prompt=True, pad_id=0)
    losses = token_losses(model, packed)
    together = torch.zeros(12)
    for r, row in enumerate(rows):
        for k, i in enumerate(row):
            together[i] = losses[r][packed["segments"][r] == k].sum()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)

    # the training loss (mean over the same response tokens) and its gradients agree too
    model.train()
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for g_padded, g_packed in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "modern"])
def test_an_example_never_sees_another_one_in_its_row(kind):
    model = tiny_model(kind)
    a, b = random_examples(2, seed=3, longest=12)
    batch = collate_packed([[a, b]], mask_prompt=True, pad_id=0)
    in_b = batch["segments"][0] == 1
    changed_a = Example(a.ids.copy(), a.n_prompt)
    changed_a.ids[:-1] = (changed_a.ids[:-1] + 7) % VOCAB  # every input token of A differs
    changed = collate_packed([[changed_a, b]], mask_prompt=True, pad_id=0)
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"])
        perturbed = model(changed["input_ids"], positions=changed["positions"], segments=changed["segments"])
        # B in the row reads exactly what B alone reads: its own tokens at positions 0, 1, ...
        b_alone = model(torch.from_numpy(b.ids[None, :-1]))
        # the control: with the plain causal mask, A's tokens do reach B
        causal = model(batch["input_ids"]), model(changed["input_ids"])
    torch.testing.assert_close(perturbed[0, in_b], logits[0, in_b], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[0, in_b], b_alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal[0][0, in_b], causal[1][0, in_b], atol=1e-3)
    assert not torch.allclose(perturbed[0, ~in_b], logits[0, ~in_b], atol=1e-3)  # A itself did change


def test_a_row_mask_is_refused_with_a_kv_cache():
    from llmstages.blocks import KVCache
    model = tiny_model("modern")
    cache = KVCache(model.config, 1, 8, torch.device("cpu"), torch.float32)
    tokens = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="packed-rows mask"):
        model(tokens, cache, positions=torch.arange(3)[None], segments=torch.zeros_like(tokens))


# --- the recipe and the stage ------------------------------------------------------------------------------
def test_packing_is_refused_for_pretraining_and_for_mean_pooled_classifiers():
    with pytest.raises(RecipeError) as err:
        build_recipe({"task": "pretrain", "finetune": {"packing": True}})
    (path, message), = err.value.problems
    assert path == "finetune.packing" and "pretraining" in message and "finetune.packing=false" in message
    with pytest.raises(RecipeError) as err:
        build_recipe({"task": "classify", "finetune": {"packing": True, "pooling": "mean"}})
    (path, message), = err.value.problems
    assert path == "finetune.packing" and "pooling mean" in message
    assert build_recipe({"task": "classify", "finetune": {"packing": True}}).finetune.packing


def test_packing_with_mean_pooling_in_the_spam_recipe_exits_2_naming_the_key(capsys, tmp_path, monkeypatch):
    from llmstages.cli import main
    monkeypatch.setenv("LLMSTAGES_STORE", str(tmp_path / "store"))
    code = main(["finetune", "--task", "spam", "finetune.packing=true", "finetune.pooling=mean"])
    err = capsys.readouterr().err
    assert code == 2 and "finetune.packing" in err and "pooling mean" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def instruction_rows(n: int = 40) -> list[dict]:
    return [{"instruction": f"Name the color number {i}.", "input": "" if i % 3 else f"Palette {i % 5}",
             "output": f"The color is {COLORS[i % len(COLORS)]}." + " Indeed." * (i % 4)} for i in range(n)]


@pytest.fixture
def instruction_setup(tmp_path):
    """A tiny random base model (run 'base') and an instruction file; returns (store, file)."""
    records = instruction_rows()
    source = tmp_path / "inst.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tok = train_bpe([format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in records] * 3, 400)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32))
    store = Store(tmp_path / "store")
    save_checkpoint(store, "base", 1, base, tok, {"task": "pretrain"})
    return store, source


def packed_recipe(source: Path, **train):
    return build_recipe({"task": "instruct", "run": "packed", "init_from": "base",
                         "data": {"source": [str(source)], "val_fraction": 0.2, "split_seed": 1},
                         "finetune": {"packing": True, "eval_samples": 0},
                         "train": {"max_steps": 4, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0,
                                   "eval_every": 0, "eval_batches": 2, "log_every": 1, "lr": 1e-3, "save_every": 2,
                                   "keep_last": 5, **train}})


def test_packed_fine_tuning_trains_reports_padding_and_resumes_exactly(instruction_setup):
    store, source = instruction_setup
    out = Console(file=StringIO(), width=300)
    result = finetune(packed_recipe(source), store, console=out)
    assert result.step == 4
    text = out.file.getvalue()
    assert "examples packed into" in text and "of the positions are padding (one example per row:" in text
    ckpt = load_checkpoint("packed", store)
    assert ckpt.meta["packing"] is True and 0 <= ckpt.meta["padding_share"] < 0.5
    log = [json.loads(line) for line in (store.run_dir("packed") / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert {r["padding_share"] for r in log if "loss" in r} == {ckpt.meta["padding_share"]}  # the log says it too

    # the run killed after step 2: resumed, it logs the losses of the run never interrupted
    shutil.rmtree(store.run_dir("packed") / "step-000004")
    (store.run_dir("packed") / "best.json").unlink(missing_ok=True)
    finetune(packed_recipe(source), store, resume=True, console=Console(file=StringIO()))
    log = [json.loads(line) for line in (store.run_dir("packed") / "log.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert resumed == pytest.approx(losses, rel=1e-6, abs=1e-7)
