"""Our checkpoints -> a folder `transformers` loads (`from_pretrained`), as the model_type they came from.

    GPT-2 blocks                               -> model_type gpt2      (interop/gpt2.py)
    rotary + RMSNorm + SwiGLU (+ GQA, biases)  -> llama, qwen2, mistral (interop/llama.py)

config.json, model.safetensors, generation_config.json and the tokenizer files (tokenizer.json, and
tokenizer_config.json with the model's special tokens and chat template) are written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Protocol

from safetensors.torch import save_file

from llmstages.errors import UserError
import llmstages.interop.gpt2 as gpt2
import llmstages.interop.llama as llama
from llmstages.model import GPT, GPTConfig
from llmstages.store import atomic_dir
from llmstages.tokenizer import Tokenizer


class ModelFiles(Protocol):
    """What `export_hf` writes: a Checkpoint, an HFModel, or anything else with these."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: Path | None


def export_family(config: GPTConfig, ref: str):
    """gpt2 or llama (the interop module that writes `config`), or a UserError naming what does not fit."""
    if config.is_gpt2() and config.hf_model_type in ("", "gpt2"):
        return gpt2
    why = llama.exportable(config)
    if why is None:
        return llama
    raise UserError(f"{ref}: export --format hf writes GPT-2 models and Llama-family ones (llama, qwen2, "
                    f"mistral); this one (arch={config.arch}) has {why}",
                    hint="export a checkpoint trained with model.arch=gpt2, or with rope, rmsnorm, swiglu blocks "
                         "and no qk_norm or soft-cap")


def export_hf(ckpt: ModelFiles, out: Path, *, force: bool, store_root: Path | None = None) -> Path:
    """Write `ckpt` as a folder `transformers` loads (from_pretrained); LoRA is merged first on a copy.

    Refuses a non-empty `out` unless `force`, and any `out` inside the store (`store_root`) or the
    checkpoint. Files are written into a temporary folder beside `out`, which then replaces it, so a
    failed export leaves `out` as it was.
    """
    out = Path(out).expanduser()
    _check_target(out, ckpt, force, store_root)
    model = ckpt.model
    family = export_family(model.config, ckpt.ref)
    if model.config.lora_rank > 0:
        from llmstages.lora import merge_lora
        model = copy.deepcopy(model)  # the caller's model keeps its adapters
        merge_lora(model)
    tokenizer = ckpt.tokenizer
    with atomic_dir(out, replace=True, manifest=False) as tmp:  # `out` is replaced only once all is written
        save_file(dict(family.from_ours(model)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dtype = model.transformer.wte.weight.dtype
        if family is gpt2:
            config = gpt2.hf_config(model.config, tokenizer.eot_id, dtype)
        else:
            config = llama.hf_config(model.config, tokenizer, dtype)
        _write_json(tmp / "config.json", config)
        if not model.config.num_classes:
            _write_json(tmp / "generation_config.json", generation_config(
                ckpt.meta.get("generate") or {}, tokenizer.eot_id, config.get("bos_token_id")))
        write_tokenizer_files(tokenizer, tmp, model.config)
    return out


def _check_target(out: Path, ckpt: ModelFiles, force: bool, store_root: Path | None) -> None:
    resolved = out.resolve()
    # The store and the checkpoint belong to llmstages: an export may neither go inside them nor
    # (with --force) replace a folder that holds them.
    owned = [Path(p).resolve() for p in (store_root, ckpt.path) if p is not None]
    for place in owned:
        if resolved == place or place in resolved.parents or resolved in place.parents:
            raise UserError(f"{out}: refusing to export into or over {place}, which llmstages manages; "
                            "nothing was written",
                            hint="export into a folder of its own, outside the store")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder", hint="give a new or empty folder with --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: the folder is not empty; nothing was written",
                            hint="give a new or empty folder, or add --force to replace its contents")
        for place in (Path.cwd().resolve(), Path.home().resolve()):
            if resolved == place or resolved in place.parents:
                raise UserError(f"{out}: refusing to replace a folder that holds {place}",
                                hint="export into a folder of its own")


def generation_config(defaults: dict, eot_id: int, bos_id: int | None = None) -> dict:
    """generation_config.json: stop at end-of-text; our recipe's sampling defaults when it samples."""
    gen: dict = {"bos_token_id": eot_id if bos_id is None else bos_id, "eos_token_id": eot_id}
    if "max_new_tokens" in defaults:
        gen["max_new_tokens"] = defaults["max_new_tokens"]
    if defaults.get("temperature", 0) > 0:
        gen.update(do_sample=True, temperature=defaults["temperature"])
        if defaults.get("top_k"):
            gen["top_k"] = defaults["top_k"]
        if defaults.get("top_p", 1.0) < 1.0:
            gen["top_p"] = defaults["top_p"]
    if defaults.get("repetition_penalty", 1.0) != 1.0:
        gen["repetition_penalty"] = defaults["repetition_penalty"]
    if defaults.get("min_new_tokens"):
        gen["min_new_tokens"] = defaults["min_new_tokens"]
    if defaults.get("stop"):
        gen["stop_strings"] = list(defaults["stop"])  # transformers' generate(..., tokenizer=...) reads them
    return gen


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path, config: GPTConfig) -> None:
    """tokenizer.json (exact), the config files AutoTokenizer reads, and GPT-2's vocab.json + merges.txt.

    A tokenizer that came with a tokenizer_config.json (hf: models and their fine-tunes) keeps it, its
    chat template included, with our end-of-text as eos_token."""
    tokenizer.save(folder / "tokenizer.json")
    if tokenizer.config:
        hf = dict(tokenizer.config, eos_token=tokenizer.eot, model_max_length=config.block_size)
        if config.num_classes:
            hf.setdefault("pad_token", tokenizer.eot)
        hf.pop("auto_map", None)  # code we do not ship
        _write_json(folder / "tokenizer_config.json", hf)
        special = {k: hf[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if hf.get(k)}
        _write_json(folder / "special_tokens_map.json", special)
        return
    special = {"bos_token": tokenizer.eot, "eos_token": tokenizer.eot, "unk_token": tokenizer.eot}
    if config.num_classes:
        special["pad_token"] = tokenizer.eot  # pads batches with end-of-text, matching config.json's pad_token_id
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False,
        "model_max_length": config.block_size, "clean_up_tokenization_spaces": False, "padding_side": "right",
    })
    bpe = json.loads(tokenizer.to_str()).get("model") or {}
    if bpe.get("type") == "BPE":  # the two-file format older GPT-2 tools read
        _write_json(folder / "vocab.json", bpe["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
