"""Hugging Face interop: `hf:` models in (GPT-2, Llama, Qwen2, Mistral), `transformers`-loadable folders out.

    hf:DIR_OR_ID  ->  hub.resolve_hf  ->  load.load_hf  ->  HFModel (our GPT, tokenizer, meta)
    checkpoint    ->  export.export_hf  ->  DIR (config.json, model.safetensors, tokenizer files)

hub.py finds and reads the files, gpt2.py and llama.py map each family's config and weights to ours
and back, chat templates are rendered by templates.py.
"""

from llmstages.interop.export import export_hf
from llmstages.interop.hub import resolve_hf
from llmstages.interop.load import SUPPORTED, HFModel, assign_weights, load_hf, load_hf_tokenizer

__all__ = ["SUPPORTED", "HFModel", "assign_weights", "export_hf", "load_hf", "load_hf_tokenizer", "resolve_hf"]
