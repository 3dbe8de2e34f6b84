"""Our checkpoints -> one GGUF file for llama.cpp and Ollama, written with the `gguf` package
(pip install gguf, or the llmstages[gguf] extra; imported only here).

    GPT-2 blocks                               -> llama.cpp arch "gpt2"
    rotary + RMSNorm + SwiGLU (+ GQA)          -> "llama" (llama, mistral and our own such models),
                                                  "qwen2" (q/k/v biases)

Names and layouts follow llama.cpp's convert_hf_to_gguf.py. Our nn.Linear weights are (out, in), which
is the numpy order GGUF stores (ggml lists dimensions the other way round), so no transposes. llama.cpp's
"llama" architecture rotates adjacent pairs (x[2i], x[2i+1]) while we (and Hugging Face) rotate
(x[i], x[i + D/2]); the rows of each head of q and k are therefore interleaved (`interleave_heads`), the
same permutation convert_hf_to_gguf.py applies. "qwen2" rotates as we do: no permutation. Llama 3
rope scaling becomes the `rope_freqs` tensor of per-frequency divisors.

The tokenizer must be a byte-level BPE (ours, GPT-2's, Llama 3's, Qwen2's, SmolLM's): it is written as
tokenizer.ggml.model "gpt2" with its vocabulary, merges and llama.cpp's name for its pre-tokenizer.
Weight matrices are stored as F16 (convert_hf_to_gguf.py's default), norms and biases as F32.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from llmstages.errors import UserError
from llmstages.interop import llama
from llmstages.model import GPT, GPTConfig
from llmstages.tokenizer import Tokenizer, special_token

# The Split regexes of Llama 3's and Qwen2's tokenizer.json, and llama.cpp's names for them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def gguf_arch(config: GPTConfig, ref: str) -> str:
    """gpt2, llama or qwen2 for `config`, or a UserError naming what llama.cpp has no equivalent for."""
    if config.num_classes:
        raise UserError(f"{ref} is a classifier; llama.cpp runs language models only",
                        hint="export it with --format hf (a ...ForSequenceClassification for transformers)")
    if config.is_gpt2():
        return "gpt2"
    why = llama.exportable(config)
    if why is None and config.bias:
        why = "biases on every linear layer (Llama's attention_bias + mlp_bias)"
    if why is not None:
        raise UserError(f"{ref}: llama.cpp has no architecture for this model (arch={config.arch}): {why}; "
                        "nothing was written",
                        hint="export --format gguf writes GPT-2 blocks, or rope + rmsnorm + swiglu blocks without "
                             "qk_norm and soft-cap (model.arch=gpt2, or mlp=swiglu qk_norm=false logit_softcap=0); "
                             "--format hf writes these blocks too")
    return "qwen2" if llama.export_type(config) == "qwen2" else "llama"


def interleave_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (heads * D, ...) with each head's halves [x_0..x_{D/2-1} | x_{D/2}..x_{D-1}] reordered
    to x_0, x_{D/2}, x_1, x_{D/2+1}, ...: rotate-half pairs become the adjacent pairs llama.cpp rotates."""
    D = w.shape[0] // heads
    return w.reshape(heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file by llama.cpp name, in file order, on the CPU in fp32."""
    config, state = model.config, {k: v.detach().float().cpu() for k, v in model.state_for_saving().items()}
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
    C, D = config.n_embd, config.n_embd // config.n_head
    for i in range(config.n_layer):
        ours, blk = f"transformer.h.{i}.", f"blk.{i}."

        def put(name: str, key: str, zeros: int = 0) -> None:  # a missing bias (bias=False) is written as zeros
            out[blk + name] = state[ours + key] if ours + key in state or not zeros else torch.zeros(zeros)

        if arch == "gpt2":
            for kind, size in (("weight", 0), ("bias", C)):
                put(f"attn_norm.{kind}", f"ln_1.{kind}", size)
                put(f"attn_qkv.{kind}", f"attn.c_attn.{kind}", 3 * size)
                put(f"attn_output.{kind}", f"attn.c_proj.{kind}", size)
                put(f"ffn_norm.{kind}", f"ln_2.{kind}", size)
                put(f"ffn_up.{kind}", f"mlp.c_fc.{kind}", 4 * size)
                put(f"ffn_down.{kind}", f"mlp.c_proj.{kind}", size)
            continue
        q, kv, F = config.n_head * D, config.kv_heads * D, config.mlp_width
        put("attn_norm.weight", "ln_1.weight")
        wq, wk, wv = state[ours + "attn.c_attn.weight"].split([q, kv, kv])
        if arch == "llama":
            wq, wk = interleave_heads(wq, config.n_head), interleave_heads(wk, config.kv_heads)
        out.update({blk + "attn_q.weight": wq, blk + "attn_k.weight": wk, blk + "attn_v.weight": wv})
        if arch == "qwen2":  # llama.cpp's qwen2 reads q/k/v biases: zeros when the model has none
            bias = state.get(ours + "attn.c_attn.bias", torch.zeros(q + 2 * kv))
            out.update(zip((blk + f"attn_{n}.bias" for n in "qkv"), bias.split([q, kv, kv])))
        put("attn_output.weight", "attn.c_proj.weight")
        put("ffn_norm.weight", "ln_2.weight")
        gate, up = state[ours + "mlp.c_fc.weight"].split([F, F])
        out.update({blk + "ffn_gate.weight": gate, blk + "ffn_up.weight": up})
        put("ffn_down.weight", "mlp.c_proj.weight")
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    if arch == "gpt2":
        out["output_norm.bias"] = state.get("transformer.ln_f.bias", torch.zeros(C))
    # llama.cpp uses token_embd as the head when `output` is missing (tied); older gpt2 loaders need it.
    if not config.tie_embeddings or arch == "gpt2":
        out["output.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
    if arch == "llama" and (config.rope_scaling or {}).get("rope_type") == "llama3":
        from llmstages.blocks import rope_frequencies
        base = rope_frequencies(D, config.rope_theta)
        out["rope_freqs.weight"] = base / rope_frequencies(D, config.rope_theta, config.rope_scaling)
    return out


def pre_tokenizer_name(tokenizer: Tokenizer, ref: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE's pre-tokenizer, or a UserError."""
    data = json.loads(tokenizer.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    name = None
    if model.get("type") == "BPE" and not model.get("byte_fallback") and kinds[-1:] == ["ByteLevel"]:
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            name = "gpt-2"  # GPT-2's regex inside ByteLevel: ours and GPT-2's
        elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            name = "smollm"
        elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            name = SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        what = f"{model.get('type')} model, pre-tokenizer {' + '.join(map(str, kinds))}"
        raise UserError(f"{ref}: its tokenizer ({what}) "
                        "is not one llama.cpp reads as a byte-level BPE that export --format gguf knows; nothing "
                        "was written", hint="export --format hf, then convert with llama.cpp's convert_hf_to_gguf.py")
    return name


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int, ref: str) -> None:
    """tokenizer.ggml.*: vocabulary (padded to the model's vocab_size), token types, merges, special ids."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, ref))
    inner = tokenizer.inner
    added = {t.content: t.special for t in inner.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = inner.id_to_token(i)
        if token is None:  # a model vocabulary rounded up past the tokenizer's (e.g. to a multiple of 64)
            token, kind = f"[PAD{i}]", gguf.TokenType.USER_DEFINED  # as convert_hf_to_gguf.py pads
        elif token in added:
            kind = gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads(tokenizer.to_str())["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    bos = special_token(tokenizer.config, "bos_token")
    bos_id = inner.token_to_id(bos) if bos else None
    writer.add_bos_token_id(tokenizer.eot_id if bos_id is None else bos_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    pad = special_token(tokenizer.config, "pad_token")
    if pad and inner.token_to_id(pad) is not None:
        writer.add_pad_token_id(inner.token_to_id(pad))
    if "add_bos_token" in tokenizer.config:
        writer.add_add_bos_token(bool(tokenizer.config["add_bos_token"]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_hyperparameters(writer, config: GPTConfig, arch: str) -> None:
    import gguf

    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.n_embd // config.n_head)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def export_gguf(ckpt, out: Path, *, force: bool, store_root: Path | None = None) -> tuple[Path, str]:
    """Write `ckpt` (a Checkpoint or HFModel) as one GGUF file at `out`; returns (path, llama.cpp arch).

    LoRA is merged first on a copy. The file is written beside `out` and renamed into place, so a failed
    export leaves nothing behind; an existing `out` is replaced only with `force`.
    """
    try:
        import gguf
    except ImportError:
        raise UserError("export --format gguf needs the gguf package, which is not installed",
                        hint="pip install gguf   (or pip install 'llmstages[gguf]')") from None
    out = Path(out).expanduser()
    _check_target(out, ckpt, force, store_root)
    model = ckpt.model
    arch = gguf_arch(model.config, ckpt.ref)
    pre_tokenizer_name(ckpt.tokenizer, ckpt.ref)  # refuse an unknown tokenizer before writing anything
    if model.config.lora_rank > 0:
        from llmstages.lora import merge_lora
        model = copy.deepcopy(model)  # the caller's model keeps its adapters
        merge_lora(model)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(str(ckpt.ref))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        add_hyperparameters(writer, model.config, arch)
        add_tokenizer(writer, ckpt.tokenizer, model.config.vocab_size, ckpt.ref)
        for name, tensor in gguf_tensors(model, arch).items():
            array = tensor.numpy()
            writer.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:  # after a failed write: close the file and remove it (after a success both are no-ops)
        writer.close()
        tmp.unlink(missing_ok=True)
    return out, arch


def _check_target(out: Path, ckpt, force: bool, store_root: Path | None) -> None:
    resolved = out.resolve()
    for place in [Path(p).resolve() for p in (store_root, ckpt.path) if p is not None]:
        if resolved == place or place in resolved.parents:
            raise UserError(f"{out}: refusing to write inside {place}, which llmstages manages; nothing was written",
                            hint="give a file outside the store, e.g. --out exports/model.gguf")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --format gguf writes one file", hint=f"e.g. --out {out / 'model.gguf'}")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; nothing was written",
                        hint="give a new file name, or add --force to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
