"""Where a Hugging Face model's files are, and reading them: `hf:DIR` (a local folder) or `hf:ORG/NAME`
(downloaded once by `huggingface_hub` into its cache, found there offline; HF_HUB_OFFLINE=1 and
HF_ENDPOINT are honoured, as huggingface_hub reads them).

A folder holds `config.json`, the weights (`model.safetensors`, sharded `model-0000x-of-0000y.safetensors`
+ `model.safetensors.index.json`, or `pytorch_model.bin`, which is read only with
`torch.load(weights_only=True)`) and tokenizer files. `WeightSource` reads safetensors one tensor at a
time (memory-mapped), so converting a model never holds the file's copy and ours in full at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.store import hash_file
from llmstages.weights import load_plain_tensors

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
SAFETENSORS_FILES = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


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


def read_hf_config(folder: Path) -> dict:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return read_json(folder / "config.json", what="model config (config.json)")


class WeightSource:
    """The tensors of a model folder by name (a `strip` prefix removed), read one at a time on the CPU.

    safetensors files are opened lazily (memory-mapped; a tensor is read when taken); pickled
    `pytorch_model.bin` files are loaded whole, with PyTorch's restricted unpickler. Never unpickles code.
    """

    def __init__(self, folder: Path, strip: str = ""):
        self.folder = folder
        self.files: dict[str, object] = {}  # name -> open safetensors handle, or a dict of loaded tensors
        self.names: dict[str, str] = {}  # our key (prefix stripped) -> name in the file
        index = folder / "model.safetensors.index.json"
        bin_index = folder / "pytorch_model.bin.index.json"
        if (folder / "model.safetensors").exists() or index.exists():
            for file in _shards(index) if index.exists() else ["model.safetensors"]:
                try:
                    handle = safe_open(str(folder / file), framework="pt", device="cpu")
                except (SafetensorError, FileNotFoundError, OSError) as err:
                    raise UserError(f"{folder / file}: cannot read the weights ({err})") from None
                self._add(handle, handle.keys(), strip)
        elif (folder / "pytorch_model.bin").exists() or bin_index.exists():
            for file in _shards(bin_index) if bin_index.exists() else ["pytorch_model.bin"]:
                state = _load_pickled_weights(folder / file)
                self._add(state, state.keys(), strip)
        else:
            raise UserError(f"{folder}: no model.safetensors (or pytorch_model.bin) in this folder")

    def _add(self, handle: object, names, strip: str) -> None:
        for name in names:
            self.names[name.removeprefix(strip) if strip else name] = name
            self.files[name] = handle

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def shape(self, key: str) -> tuple[int, ...]:
        name = self.names[key]
        handle = self.files[name]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def take(self, key: str) -> torch.Tensor:
        """The tensor `key`; a pickled file's copy is dropped once taken."""
        name = self.names[key]
        handle = self.files[name]
        return handle.pop(name) if isinstance(handle, dict) else handle.get_tensor(name)


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


def fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of config.json and the weight files: which exact weights a run started from."""
    h = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for name in names:
        h.update(name.encode())
        hash_file(folder / name, h)
    return h.hexdigest()[:16]


