"""Train a 2-layer model on Tiny-Shakespeare-like synthetic text through the shared loop (no prepare step).

    python train_synthetic.py STORE STEPS [--resume] [--allow-change] [--nan-at STEP] [--nan-grad-at STEP]
                              [--spike-at STEP] [--signal SIG@MICRO[@parent]] [--sleep S] [--classify]
                              [--sample] [KEY=VALUE ...]

--nan-at: the loss is NaN from step index STEP on; --nan-grad-at: the loss stays finite but its
gradient is NaN from STEP on (the update makes the weights NaN before any loss shows it);
--spike-at: the loss of step index STEP only is 50x (a bad batch).
--sleep S: every micro-batch also sleeps S seconds, so that a step takes a steady time on a busy
machine (tests of train.max_time).
--classify: a 2-class head read at each window's last token (the label: whether the window holds more
"the" than "my" tokens), trained as the classify stage trains; --sample: every evaluation also samples
8 greedy tokens on rank 0 (as instruct's on_eval does). finetune.trainable=lora|last_blocks:N freezes
as fine-tuning does.

Used by tests/test_loop.py in real subprocesses (kill, resume, torchrun). Exit codes follow the CLI.
`--signal TERM@31` sends SIGTERM to this process while it computes micro-batch 31 (rank 0 only; the
micro-batches of step s are s*2 and s*2+1 on one process, s*2 on rank 0 of two), so a test stops a run
at an exact point mid-step without sleeping; `@parent` sends it to the parent (torchrun's agent) instead,
as a user's kill of torchrun would. Repeatable; under torchrun give it as SYN_SIGNAL=SPEC in the environment.
"""

import os
import signal
import sys
import time

import numpy as np
import torch

from llmstages.cli import main as cli_main  # noqa: F401  (the same process setup as the CLI)
from llmstages.config import build_recipe
from llmstages.errors import StopTraining, UserError
from llmstages.loop import TrainTask, train
from llmstages.model import GPT
from llmstages.classification import classification_loss
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.sampling import generate_tokens
from llmstages.stages.finetune import set_trainable
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.distributed import exit_process
from llmstages.stages.pretrain import model_config
from llmstages.store import Store
from llmstages.tokenizer import train_bpe

WORDS = "the king shall speak of love and war to thee my lord for all is well that ends".split()


def corpus(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def main() -> int:
    store, steps, *rest = sys.argv[1:]
    flags = {a for a in rest if a.startswith("--")}
    signals = {}  # micro-batch index -> (signal, target pid)
    specs = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--signal"]
    specs += os.environ.get("SYN_SIGNAL", "").split()  # under torchrun (whose parser would take --signal)
    for spec in specs:
        name, micro, *to = spec.split("@")
        signals[int(micro)] = (getattr(signal, f"SIG{name}"), os.getppid() if to == ["parent"] else os.getpid())
    if os.environ.get("RANK", "0") != "0":
        signals = {}
    nan_at = int(rest[rest.index("--nan-at") + 1]) if "--nan-at" in rest else None
    sleep = float(rest[rest.index("--sleep") + 1]) if "--sleep" in rest else 0.0
    nan_grad_at = int(rest[rest.index("--nan-grad-at") + 1]) if "--nan-grad-at" in rest else None
    spike_at = int(rest[rest.index("--spike-at") + 1]) if "--spike-at" in rest else None
    overrides = [a for a in rest if "=" in a]
    tok = train_bpe([corpus(5000, 0)], int(rest[rest.index("--vocab") + 1]) if "--vocab" in rest else 300)
    train_ids = np.array(tok.encode(corpus(20000, 1)), dtype=np.uint16)
    val_ids = np.array(tok.encode(corpus(3000, 2)), dtype=np.uint16)
    recipe = build_recipe({"run": "syn", "model": {"block_size": 64, "dropout": 0.1}, "train": {
        "max_steps": int(steps), "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 10,
        "save_every": 10, "log_every": 5, "warmup_steps": 3, "lr": 3e-3, "min_lr": 3e-4}}, overrides)
    torch.manual_seed(0)
    config = model_config(recipe.model, tok.vocab_size)  # tiny, 64 tokens, unless overridden
    if "--classify" in flags:
        config.num_classes, config.class_names = 2, ["fewer", "more"]
    model = GPT(config)
    if recipe.finetune.trainable != "all":
        set_trainable(model, recipe.finetune)
    sampler = WindowSampler([train_ids], 64, 4, recipe.train.seed)
    val = fixed_windows([val_ids], 64, 4, 2)

    def loss(m, batch):
        if batch["micro"] in signals:
            os.kill(*reversed(signals.pop(batch["micro"])))  # mid-step: after the batch is drawn, before backward
        time.sleep(sleep)
        value = (classification_loss(m, batch, adversarial_eps=recipe.finetune.adversarial_eps) if "--classify" in flags
                 else lm_loss(m, batch))
        if nan_grad_at is not None and batch["index"] >= nan_grad_at:
            # sqrt(0) is 0 forward, its gradient is inf: 0 * inf = NaN reaches every weight, the loss stays finite
            value = value + 0 * sum((p * 0).sum() for p in m.parameters()).sqrt()
        if spike_at is not None and batch["index"] == spike_at:
            value = value * 50
        return value * float("nan") if nan_at is not None and batch["index"] >= nan_at else value

    the, my = tok.encode(" the")[0], tok.encode(" my")[0]

    def classified(b):  # LM windows -> (input_ids, last_index, targets: 1 when "the" outnumbers "my")
        ids = b["input_ids"]
        labels = ((ids == the).sum(1) > (ids == my).sum(1)).long()
        return dict(b, last_index=torch.full((ids.size(0),), ids.size(1) - 1), targets=labels)

    def batch(index):
        b = sampler(index)
        b = classified(b) if "--classify" in flags else b
        return dict(b, index=index // (recipe.train.global_batch_size // 4), micro=index)

    def evaluate(m):
        if "--classify" in flags:
            return {"val_loss": sum(float(classification_loss(m, classified(b))) for b in val) / len(val)}
        return lm_metrics(m, val)

    def sample(m):
        was_training = m.training
        try:
            return {"sample": list(generate_tokens(m, tok.encode(" the king"), max_new_tokens=8))}
        finally:
            m.train(was_training)

    data_fingerprint = rest[rest.index("--data") + 1] if "--data" in rest else "synthetic"
    task = TrainTask("classify" if "--classify" in flags else "pretrain", batch, loss, evaluate, data_fingerprint,
                     on_eval=sample if "--sample" in flags else None)
    try:
        result = train(model, tok, recipe, task, Store(store), stage="pretrain", resume="--resume" in flags,
                       allow_change="--allow-change" in flags)
    except StopTraining as stop:
        return 128 + stop.signum
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"done {result.step}")
    return 0


if __name__ == "__main__":
    exit_process(main())  # as the CLI ends (a torchrun worker skips the teardown)
