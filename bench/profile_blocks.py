"""Where a training step's CPU time goes, for the gpt2 and the modern blocks, in fp32 and bf16 (issue 12).

    python bench/profile_blocks.py [--layers 2] [--width 128] [--batch 8] [--steps 3] [--quick]

For each arch x precision: torch.profiler over a few forward + backward + optimizer steps of a small
model, giving the step time, the share of self CPU time of each group of ops (matmuls, attention,
norms, the MLP activation, rotary embeddings, embeddings + loss + soft-cap, optimizer, the rest), and the number
of profiled op calls per step at sequence lengths T and 2T, the batch halved at 2T so that a step
holds the same tokens (the fp32 loss runs over chunks of tokens, objectives.head_loss, a fixed count
per step then). That count is the same at both lengths when nothing runs once per position in Python
(a per-position loop would double it). Prints one JSON object.
Timing figures from a busy machine mean little; the op counts and shares are what this checks.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import llmstages.blocks as blocks
from llmstages.config import build_recipe
from llmstages.model import GPT, build_config
from llmstages.optim import build_optimizer
from llmstages.runtime import autocast, cpu_has_fast_bf16

GROUPS = {  # op name fragments -> group (first match wins); "rope" comes from a record_function label
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "norm": ("layer_norm", "rms_norm"),
    "activation": ("gelu", "relu", "threshold_backward", "aten::pow", "aten::square"),
    "embedding, loss, softcap": ("embedding", "cross_entropy", "log_softmax", "nll_loss", "aten::tanh"),
    "optimizer": ("_fused_adamw", "adamw", "aten::_foreach", "muon", "aten::lerp"),
}


LABELS = ("rope", "norm")  # forward calls run inside profiler ranges of these names (see `labelled`)


@contextmanager
def labelled():
    """apply_rope and F.rms_norm inside profiler ranges named `rope` and `norm`: on CPU both are composites
    of small ops (mul, cat, pow, mean, rsqrt...), which would otherwise count as `other` or `activation`."""
    import torch.nn.functional as F

    originals = (blocks.apply_rope, F.rms_norm)

    def rope(x, cos, sin):
        with record_function("rope"):
            return originals[0](x, cos, sin)

    def rms_norm(*args, **kwargs):
        with record_function("norm"):
            return originals[1](*args, **kwargs)

    blocks.apply_rope, F.rms_norm = rope, rms_norm
    try:
        yield
    finally:
        blocks.apply_rope, F.rms_norm = originals


def group_of(event) -> str:
    """The group of a profiled op: a labelled range it runs inside, else its name."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in LABELS:
            return parent.name
        parent = parent.cpu_parent
    return next((g for g, keys in GROUPS.items() if any(k in event.name for k in keys)), "other")


def step_fn(arch: str, precision: str, args, block_size: int, batch: int):
    torch.manual_seed(0)
    config = build_config("", vocab_size=2048, arch=arch, n_layer=args.layers, n_head=4, n_embd=args.width,
                          block_size=block_size)
    model = GPT(config).train()
    train_cfg = build_recipe({"train": {"optimizer": "muon" if arch == "modern" else "adamw"}}).train
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    amp = autocast(torch.device("cpu"), precision)
    data = torch.randint(0, 2048, (batch, block_size + 1))

    def step():
        with amp:
            loss = model(data[:, :-1], targets=data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profile_one(arch: str, precision: str, args, block_size: int, batch: int) -> dict:
    step = step_fn(arch, precision, args, block_size, batch)
    step(), step()  # warm-up: allocations, first-call dispatch
    with labelled(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.events() if e.name not in LABELS]
    shares = {name: 0.0 for name in [*GROUPS, *LABELS, "other"]}
    for e in events:
        shares[group_of(e)] += e.self_cpu_time_total
    total = sum(shares.values())
    calls = len(events) / args.steps
    return {"step_ms": round(total / 1000 / args.steps, 2), "op_calls_per_step": round(calls),
            "self_time_share": {k: round(v / total, 3) for k, v in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128, help="T; the op count is also taken at 2T")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the smallest sizes (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.batch, args.block, args.steps = 1, 64, 4, 32, 1
    if args.batch < 4 or args.batch % 2:
        parser.error(f"--batch {args.batch}: an even batch of at least 4 is needed (it is halved at 2T, and a "
                     "batch of 1 takes other op paths)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"benchmark": "profile_blocks", "cpu_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__,
              "shape": {"layers": args.layers, "width": args.width, "batch": args.batch, "T": args.block},
              "runs": {}}
    for arch in ("gpt2", "modern"):
        for precision in ("fp32", "bf16"):
            figures = profile_one(arch, precision, args, args.block, args.batch)
            longer = profile_one(arch, precision, args, 2 * args.block, args.batch // 2)  # the same tokens
            figures["op_calls_per_step_2T"] = longer["op_calls_per_step"]
            figures["no_python_per_token"] = longer["op_calls_per_step"] == figures["op_calls_per_step"]
            figures["step_ms_2T"] = longer["step_ms"]
            result["runs"][f"{arch}-{precision}"] = figures
    print(json.dumps(result))


if __name__ == "__main__":
    main()
