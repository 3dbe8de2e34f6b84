"""Hugging Face interop: GPT-2 weights in, `transformers`-loadable folders out.

    hf:DIR_OR_ID  ->  load_hf  ->  HFModel (our GPT, tokenizer, meta)  ->  export_hf  ->  DIR

A Hugging Face GPT-2 folder holds `config.json`, the weights (`model.safetensors`, sharded
`model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`, or `pytorch_model.bin`, which is
read only with `torch.load(weights_only=True)`) and tokenizer files (`tokenizer.json`, or
`vocab.json` + `merges.txt`). `transformers` is not needed: we read the JSON and safetensors ourselves.

Weight layout. HF GPT-2 uses `Conv1D` for its four linear layers, storing W as (in, out); our
`nn.Linear` stores (out, in), so those four are transposed both ways. Everything else (embeddings,
LayerNorms, biases, the class head `score` (K, C)) has the same layout. The LM head is tied to
`wte`, so `lm_head.weight` is not stored; `attn.bias` / `attn.masked_bias` are causal-mask buffers
of old `transformers` versions and are ignored. Names appear with a `transformer.` prefix
(GPT2LMHeadModel, GPT2ForSequenceClassification) or without (GPT2Model, the hub's `gpt2` files).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.model import GPT, GPTConfig
from llmstages.store import atomic_dir, hash_file
from llmstages.tokenizer import EOT, Tokenizer
from llmstages.weights import check_finite, config_from_mapping, load_plain_tensors

# HF GPT-2's Conv1D layers: weight (in, out) there, (out, in) here.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers of old transformers versions (not weights), and GPT2DoubleHeadsModel's extra head.
IGNORED = re.compile(r"h\.\d+\.(attn\.bias|attn\.masked_bias|crossattention\.bias)|multiple_choice_head\..*")
# The activations that are GELU with the tanh approximation, as our MLP computes it.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
SAFETENSORS_FILES = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


@dataclass
class HFModel:
    """What `load_hf` reads: our model, its tokenizer and a meta dict (checkpoint.py wraps it as a Checkpoint)."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: None = None  # not a folder of the store

    @property
    def ref(self) -> str:
        return self.meta["source"]


class ModelFiles(Protocol):
    """What `export_hf` writes: a Checkpoint, an HFModel, or anything else with these."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: Path | None


# ---------------------------------------------------------------------------------------------------
# where the files are: a local folder, or a hub id through the Hugging Face cache
# ---------------------------------------------------------------------------------------------------
def resolve_hf(dir_or_id: str, *, weights: bool = True) -> Path:
    """The local folder of `hf:DIR_OR_ID`: the folder itself, or the hub id's snapshot in the HF cache.

    A hub id (`gpt2`, `openai-community/gpt2-medium`) is downloaded once by `huggingface_hub` (only the
    config, safetensors weights and tokenizer files; `weights=False` fetches no weights) and then
    found in its cache offline. Offline and not cached -> UserError naming the local-folder way.
    """
    path = Path(dir_or_id).expanduser()
    if path.is_dir():
        return path
    looks_like_path = dir_or_id.startswith((".", "/", "~")) or dir_or_id.count("/") > 1 or "\\" in dir_or_id
    if looks_like_path or not dir_or_id:
        raise UserError(f"hf:{dir_or_id}: no such folder",
                        hint="give a folder holding config.json, model.safetensors and tokenizer files, or a hub id")
    return _download(dir_or_id, weights=weights)


def _download(repo_id: str, *, weights: bool) -> Path:
    name = repo_id.rsplit("/", 1)[-1]
    offline_hint = (f"on a machine with internet run `hf download {repo_id} --local-dir ./{name}` "
                    f"(older huggingface_hub: `huggingface-cli download ...`), copy the folder here "
                    f"and use hf:./{name}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise UserError(f"hf:{repo_id}: not a local folder, and huggingface_hub is not installed to fetch it",
                        hint=f"pip install huggingface_hub, or {offline_hint}") from None
    patterns = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns + (SAFETENSORS_FILES if weights else [])))
        if weights and not any(folder.glob("model*.safetensors")):  # an older repo with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns + BIN_FILES))
    except GatedRepoError:
        raise UserError(f"hf:{repo_id}: the model is gated on the Hugging Face hub",
                        hint="accept its terms on the model's hub page and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"hf:{repo_id}: no such folder here, and no such model on the Hugging Face hub "
                        "(or it is private: log in with `hf auth login`)",
                        hint="check the spelling (e.g. hf:gpt2, hf:gpt2-medium) or give a local folder") from None
    except HFValidationError:
        raise UserError(f"hf:{repo_id}: no such folder, and not a valid hub id (ORG/NAME)") from None
    except OSError as err:  # LocalEntryNotFoundError (offline, not cached), network and HTTP errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"hf:{repo_id}: cannot get {repo_id!r} from the Hugging Face hub, and the local Hugging "
                        f"Face cache does not hold it ({reason})", hint=offline_hint) from None
    if weights and not any(folder.glob("model*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"hf:{repo_id}: the Hugging Face cache ({folder}) holds no weights for it "
                        "(only the tokenizer was fetched, or the download was cut off)", hint=offline_hint)
    return folder


# ---------------------------------------------------------------------------------------------------
# config.json <-> GPTConfig
# ---------------------------------------------------------------------------------------------------
def read_hf_config(folder: Path) -> dict:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return read_json(folder / "config.json", what="model config (config.json)")


# config.json keys read below, by the type they must have (anything else would fail deep inside).
HF_INT_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd")
HF_OPTIONAL_INT_KEYS = ("n_positions", "n_ctx", "n_inner")  # null = the default
HF_FLOAT_KEYS = ("layer_norm_epsilon", "resid_pdrop")


def _check_hf_types(hf: dict, where: str) -> None:
    def not_int(value) -> bool:
        return not isinstance(value, int) or isinstance(value, bool)

    problems = [f"{k}={hf[k]!r:.40} (expected an integer)" for k in HF_INT_KEYS if k in hf and not_int(hf[k])]
    problems += [f"{k}={hf[k]!r:.40} (expected an integer or null)" for k in HF_OPTIONAL_INT_KEYS
                 if hf.get(k) is not None and not_int(hf[k])]
    problems += [f"{k}={hf[k]!r:.40} (expected a number)" for k in HF_FLOAT_KEYS
                 if k in hf and (not isinstance(hf[k], (int, float)) or isinstance(hf[k], bool))]
    if not isinstance(hf.get("id2label") or {}, dict) or not isinstance(hf.get("architectures") or [], list):
        problems.append("id2label must be an object and architectures a list")
    if problems:
        raise UserError(f"{where}: corrupt config.json:\n  " + "\n  ".join(problems))


def config_from_hf(hf: dict, num_classes: int, where: str) -> GPTConfig:
    """Our GPTConfig for an HF GPT-2 config; refuses settings our model would compute differently."""
    _check_hf_types(hf, where)
    problems = []

    def expect(key: str, ok: bool, ours: str) -> None:
        if not ok:
            problems.append(f"{key}={hf.get(key)!r} (llmstages supports {ours})")

    expect("model_type", hf.get("model_type", "gpt2") == "gpt2", "gpt2 only")
    expect("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELU, "gelu_new")
    expect("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-5")
    n_embd, n_head = hf.get("n_embd", 768), hf.get("n_head", 12)
    expect("n_inner", hf.get("n_inner") in (None, 4 * n_embd), f"4 * n_embd = {4 * n_embd}")
    expect("n_head", n_head > 0 and n_embd % n_head == 0, "a divisor of n_embd")
    expect("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true")
    expect("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false")
    expect("add_cross_attention", not hf.get("add_cross_attention", False), "false")
    if problems:
        raise UserError(f"{where}: this GPT-2 variant cannot be loaded exactly:\n  " + "\n  ".join(problems),
                        hint="only standard GPT-2 configurations are supported (the logits would be wrong)")
    class_names: list[str] = []
    if num_classes:
        id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items() if str(k).isdigit()}
        class_names = [id2label.get(i, f"LABEL_{i}") for i in range(num_classes)]
    return config_from_mapping(dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions") or hf.get("n_ctx") or 1024,
        n_layer=hf.get("n_layer", 12), n_head=n_head, n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.0)),  # GPT-2 uses one rate everywhere (0.1 in the originals)
        bias=True, num_classes=num_classes, class_names=class_names,
    ), where)


def hf_config(config: GPTConfig, eot_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `transformers`: GPT2LMHeadModel, or GPT2ForSequenceClassification with labels."""
    hf = {
        "architectures": ["GPT2ForSequenceClassification" if config.num_classes else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": str(dtype).removeprefix("torch."),
    }
    if config.num_classes:
        names = config.class_names or [f"LABEL_{i}" for i in range(config.num_classes)]
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
        hf["problem_type"] = "single_label_classification"
        # HF pools each row at its last token that is not the pad token: pad with end-of-text, as we do.
        hf["pad_token_id"] = eot_id
    return hf


# ---------------------------------------------------------------------------------------------------
# weights <-> our state dict
# ---------------------------------------------------------------------------------------------------
def hf_tensor_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF GPT-2 with this config, by HF name (without `transformer.`), in HF layout."""
    C, V, P, K = config.n_embd, config.vocab_size, config.block_size, config.num_classes
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),  # Conv1D (in, out)
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if K:
        shapes["score.weight"] = (K, C)  # nn.Linear in HF too: (out, in)
    return shapes


def our_name(hf_name: str) -> str:
    return hf_name if hf_name == "score.weight" else "transformer." + hf_name


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder on the CPU, by their names in the files. Never unpickles code."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists() or index.exists():
        files = _shards(index) if index.exists() else ["model.safetensors"]
        state: dict[str, torch.Tensor] = {}
        for name in files:
            try:
                state.update(load_file(str(folder / name)))
            except (SafetensorError, FileNotFoundError, OSError) as err:
                raise UserError(f"{folder / name}: cannot read the weights ({err})") from None
        return state
    bin_index = folder / "pytorch_model.bin.index.json"
    if (folder / "pytorch_model.bin").exists() or bin_index.exists():
        files = _shards(bin_index) if bin_index.exists() else ["pytorch_model.bin"]
        state = {}
        for name in files:
            state.update(_load_pickled_weights(folder / name))
        return state
    raise UserError(f"{folder}: no model.safetensors (or pytorch_model.bin) in this folder")


def _shards(index: Path) -> list[str]:
    """The weight files an index names: plain file names in the same folder (never a path out of it)."""
    weight_map = read_json(index, what="shard index").get("weight_map")
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
    if not names or not all(isinstance(n, str) and n == Path(n).name and n not in (".", "..") for n in names):
        raise UserError(f"{index}: not a valid shard index (weight_map must map tensor names to file names "
                        "in this folder)")
    return names


def _load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, with PyTorch's restricted unpickler: tensors and plain containers only."""
    state = load_plain_tensors(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def hf_to_ours(hf_state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (no lm_head: it is tied). Every tensor checked by name and shape."""
    found = {name.removeprefix("transformer."): tensor for name, tensor in hf_state.items()}
    found = {k: v for k, v in found.items() if not IGNORED.fullmatch(k)}
    head = found.pop("lm_head.weight", None)
    expected = hf_tensor_shapes(config)
    unexpected = sorted(k for k in found if k not in expected)
    missing = sorted(k for k in expected if k not in found)
    if unexpected or missing:
        raise UserError(f"{where}: the weights do not match a GPT-2 with this config.json: "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(found[key].shape) != shape:
            raise UserError(f"{where}: tensor {key} has shape {tuple(found[key].shape)}, "
                            f"expected {shape} from config.json")
    if head is not None and not torch.equal(head, found["wte.weight"]):
        raise UserError(f"{where}: lm_head.weight differs from wte.weight (an untied output head)",
                        hint="llmstages ties the LM head to the token embedding, as GPT-2 does")
    # Conv1D (in, out) -> Linear (out, in); contiguous so the model owns plain tensors.
    return {our_name(k): (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in found.items()}


def ours_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our model's weights under HF names (`transformer.` prefix), Conv1D-transposed, on the CPU.

    A model without biases gets zero biases, which computes the same function.
    """
    state = model.state_for_saving()  # lm_head is tied: not saved, as transformers' save_pretrained does
    out = {}
    for key, shape in hf_tensor_shapes(model.config).items():
        tensor = state.get(our_name(key))
        if tensor is None:  # bias=False
            tensor = torch.zeros(shape, dtype=model.transformer.wte.weight.dtype)
        tensor = tensor.t() if key.endswith(CONV1D) else tensor
        out[our_name(key)] = tensor.detach().to("cpu").contiguous()
    return out


# ---------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------
def load_hf(dir_or_id: str, device: str | torch.device = "cpu") -> HFModel:
    """Load `hf:DIR_OR_ID` (GPT-2 LM, or a sequence classifier with `score`) as plain model, tokenizer, meta."""
    folder = resolve_hf(dir_or_id)
    where = f"hf:{dir_or_id}" + (f" ({folder})" if str(folder) != dir_or_id else "")
    hf = read_hf_config(folder)
    hf_state = read_hf_weights(folder)
    score = hf_state.get("score.weight")
    if score is not None and score.dim() != 2:
        raise UserError(f"{where}: score.weight has shape {list(score.shape)}, expected (classes, n_embd)")
    if score is None and any("ForSequenceClassification" in a for a in hf.get("architectures") or []):
        raise UserError(f"{where}: config.json says sequence classifier, but there is no score.weight")
    config = config_from_hf(hf, score.shape[0] if score is not None else 0, where)
    tokenizer = load_hf_tokenizer(dir_or_id, folder=folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{config.vocab_size} embeddings (tokenizer files of another model?)")
    state = hf_to_ours(hf_state, config, where)  # names and shapes checked before anything is allocated
    check_finite(state, where)
    model = GPT(config)
    model.load_saved_state(state)
    # `ref` is what a fine-tuned run records as its parent: a local folder as an absolute path.
    local = Path(dir_or_id).expanduser().is_dir()
    meta = {
        "task": "classify" if config.num_classes else "pretrain",
        "source": f"hf:{dir_or_id}", "ref": f"hf:{folder.resolve()}" if local else f"hf:{dir_or_id}",
        "hf_path": str(folder),
        "hf_architectures": hf.get("architectures") or [],
        "fingerprint": _fingerprint(folder), "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    # eval mode: GPT-2 configs carry dropout 0.1, which training turns on with model.train()
    return HFModel(model.to(device).eval(), tokenizer, meta)


def load_hf_tokenizer(dir_or_id: str, *, folder: Path | None = None) -> Tokenizer:
    """The tokenizer of `hf:DIR_OR_ID` (tokenizer.json, or vocab.json + merges.txt); fetches no weights."""
    folder = folder or resolve_hf(dir_or_id, weights=False)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists():
        raise UserError(f"hf:{dir_or_id}: no tokenizer files in {folder} (tokenizer.json, or vocab.json + merges.txt)",
                        hint="copy the tokenizer files of the model into the folder "
                             "(GPT-2's are the same for every size)")
    return Tokenizer.from_file(folder)


def _fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of config.json and the weight files: which exact weights a run started from."""
    h = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for name in names:
        h.update(name.encode())
        hash_file(folder / name, h)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------
def export_hf(ckpt: ModelFiles, out: Path, *, force: bool, store_root: Path | None = None) -> Path:
    """Write `ckpt` as a folder `transformers` loads (from_pretrained); LoRA is merged first on a copy.

    Refuses a non-empty `out` unless `force`, and any `out` inside the store (`store_root`) or the
    checkpoint. Files are written into a temporary folder beside `out`, which then replaces it, so a
    failed export leaves `out` as it was.
    """
    out = Path(out).expanduser()
    _check_target(out, ckpt, force, store_root)
    model = ckpt.model
    if not model.config.is_gpt2():
        raise UserError(f"{ckpt.ref}: export --format hf writes GPT-2 models; this one has "
                        f"arch={model.config.arch} blocks (rotary / RMSNorm / other MLP or head choices)",
                        hint="export a checkpoint trained with model.arch=gpt2")
    if model.config.lora_rank > 0:
        from llmstages.lora import merge_lora
        model = copy.deepcopy(model)  # the caller's model keeps its adapters
        merge_lora(model)
    tokenizer = ckpt.tokenizer
    with atomic_dir(out, replace=True, manifest=False) as tmp:  # `out` is replaced only once all is written
        save_file(ours_to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dtype = model.transformer.wte.weight.dtype
        _write_json(tmp / "config.json", hf_config(model.config, tokenizer.eot_id, dtype))
        if not model.config.num_classes:
            _write_json(tmp / "generation_config.json", generation_config(ckpt.meta.get("generate") or {},
                                                                           tokenizer.eot_id))
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


def generation_config(defaults: dict, eot_id: int) -> dict:
    """generation_config.json: stop at end-of-text; our recipe's sampling defaults when it samples."""
    gen: dict = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    if "max_new_tokens" in defaults:
        gen["max_new_tokens"] = defaults["max_new_tokens"]
    if defaults.get("temperature", 0) > 0:
        gen.update(do_sample=True, temperature=defaults["temperature"])
        if defaults.get("top_k"):
            gen["top_k"] = defaults["top_k"]
        if defaults.get("top_p", 1.0) < 1.0:
            gen["top_p"] = defaults["top_p"]
    return gen


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path, config: GPTConfig) -> None:
    """tokenizer.json (exact), the config files AutoTokenizer reads, and GPT-2's vocab.json + merges.txt."""
    tokenizer.save(folder / "tokenizer.json")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if config.num_classes:
        special["pad_token"] = EOT  # pads batches with end-of-text, matching config.json's pad_token_id
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
