"""finetune.frozen_dtype: the weights a fine-tune does not train held in bf16 (issue 14's memory point).

Tiny models and synthetic spam/ham files (tests/spamdata.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmstages.checkpoint import save_checkpoint
from llmstages.config import build_recipe
from llmstages.errors import UserError
from llmstages.model import GPT, GPTConfig
from llmstages.stages.finetune import finetune, hold_frozen_weights, set_trainable
from llmstages.store import Store
from spamdata import labeled_rows, quiet, save_base, spam_tokenizer, write_tsv


@pytest.fixture(scope="module")
def tokenizer():
    return spam_tokenizer()


def recipe(source, *overrides: str):
    raw = {"task": "classify", "run": "clf", "init_from": "base",
           "data": {"source": [str(source)], "columns": ["label", "text"], "val_fraction": 0.2, "test_fraction": 0.2},
           "train": {"max_steps": 4, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 1,
                     "eval_every": 2, "save_every": 2, "log_every": 1, "lr": 3e-3, "min_lr": 3e-4}}
    return build_recipe(raw, ["finetune.trainable=lora", "finetune.lora_rank=4", *overrides])


def test_only_frozen_matrices_are_cast_and_the_forward_pass_stays_close():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    set_trainable(model, recipe("unused.tsv").finetune)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = hold_frozen_weights(model, "bf16")
    cast = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert cast == {n for n, p in model.named_parameters() if not p.requires_grad and p.dim() >= 2}
    assert cast and all("lora_" not in n and not n.endswith(("bias", "ln_1.weight")) for n in cast)
    assert saved == sum(reference[n].numel() * 2 for n in cast)
    for name, p in model.named_parameters():  # bf16 holds each weight rounded, nothing else
        assert torch.equal(p.float(), reference[name].to(p.dtype).float())
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx).float()
    fp32 = GPT(model.config)
    fp32.load_state_dict({n: t for n, t in reference.items()}, strict=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fp32(idx).float()
    assert torch.allclose(logits, expected, atol=0.1), (logits - expected).abs().max()


def test_lora_finetune_with_bf16_frozen_weights(tmp_path, store_dir, tokenizer):
    save_base(store_dir, tokenizer)
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    store = Store(store_dir)
    result = finetune(recipe(source, "finetune.frozen_dtype=bf16", "train.precision=bf16"), store, console=quiet())
    assert result.step == 4
    before = load_file(str(store.latest("base") / "model.safetensors"))
    after = load_file(str(store.run_dir("clf") / "step-000004" / "model.safetensors"))
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], before[name].to(torch.bfloat16))
    for name in ("score.weight", "transformer.h.0.attn.c_attn.lora_B", "transformer.ln_f.weight"):
        assert after[name].dtype == torch.float32
    assert not torch.equal(after["transformer.h.0.attn.c_attn.lora_B"], torch.zeros_like(after["transformer.h.0.attn.c_attn.lora_B"]))


def test_dry_run_counts_the_halved_weights(tmp_path, store_dir, tokenizer):
    torch.manual_seed(0)  # wide enough that the weights show in MiB
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=128))
    save_checkpoint(Store(store_dir), "base", 1, model, tokenizer, {"task": "pretrain"})
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    figures = {}
    for dtype in ("fp32", "bf16"):
        r = recipe(source, f"finetune.frozen_dtype={dtype}", "train.precision=bf16")
        figures[dtype] = finetune(r, Store(store_dir), dry_run=True, console=quiet())["estimated weights (MiB)"]
    assert figures["bf16"] < 0.6 * figures["fp32"]


def test_bf16_frozen_weights_without_bf16_compute_are_refused_before_anything_is_written(tmp_path, store_dir,
                                                                                         tokenizer):
    save_base(store_dir, tokenizer)
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    with pytest.raises(UserError, match="frozen_dtype=bf16 needs bf16 compute"):
        finetune(recipe(source, "finetune.frozen_dtype=bf16", "train.precision=fp32"), Store(store_dir), console=quiet())
    assert not (store_dir / "runs" / "clf").exists()
    assert not (store_dir / "data").exists() or not any((store_dir / "data").iterdir())
