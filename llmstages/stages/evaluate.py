"""`llmstages evaluate`: a model's figures on data it may never have seen.

The kind of evaluation follows the model: a classifier gets accuracy, per-class precision/recall/F1
and the confusion matrix (stages/classify.py); an instruction model gets response loss, exact match
and ROUGE-L (stages/instruct.py); any other language model gets loss, perplexity and bits per byte
on text (here). Files are read with the settings the model was trained with (`data_settings` in
its checkpoint: format, columns, field names), so the same kind of file works without a recipe.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console

from llmstages.checkpoint import Checkpoint, load_checkpoint
from llmstages.data.examples import BadExamples, data_settings, read_examples
from llmstages.data.windows import fixed_windows
from llmstages.errors import UserError
from llmstages.objectives import lm_metrics
from llmstages.store import Store
from llmstages.tokenizer import token_byte_lengths


def evaluate_text(ckpt: Checkpoint, paths: list[str], *, limit: int | None = None, batch_size: int = 8) -> dict:
    """Loss, perplexity and bits per byte of a language model on text documents.

    Documents are tokenized, joined with <|endoftext|> and cut into non-overlapping windows of the
    model's context; every token after the first of each window is predicted once.
    """
    cfg = data_settings(ckpt.meta)
    try:
        documents = read_examples(paths, "pretrain", cfg, limit=limit)
    except BadExamples as err:
        if any("instruction" in record.reason.partition("(fields: ")[2] for record in err.bad):  # no --template
            raise BadExamples(err.bad, hint="these are instruction/response records and the model is a plain "
                              "language model: add --template alpaca to score its responses (as the "
                              "instruction models are scored)") from None
        raise
    tok = ckpt.tokenizer
    ids: list[int] = []
    for encoded in tok.encode_batch([d.text for d in documents]):
        ids += encoded + [tok.eot_id]
    block = ckpt.model.config.block_size
    tokens = np.array(ids, dtype=np.int64)
    if len(tokens) < 2:
        raise UserError("the evaluation text is too short to predict anything")
    block = min(block, len(tokens) - 1)
    windows = fixed_windows([tokens], block, batch_size, n_batches=len(tokens))
    token_bytes = torch.tensor(token_byte_lengths(tok))
    ckpt.model.eval()
    with torch.inference_mode():
        metrics = lm_metrics(ckpt.model, windows, token_bytes, prefix="")
    return {"loss": metrics["loss"], "perplexity": metrics["ppl"], "bits_per_byte": metrics.get("bpb"),
            "tokens": metrics["tokens"], "documents": len(documents), "bytes": sum(d.nbytes for d in documents)}


def evaluate(model_ref: str, paths: list[str], store: Store, *, limit: int | None = None,
             console: Console | None = None, template: str | None = None, threshold: float | None = None) -> dict:
    """`template` scores any language model on instruction data with that prompt template (e.g. a base
    model before instruction fine-tuning); instruction models use their own template by default.
    `threshold` (classifiers): the positive class's probability a label needs (None: the model's own)."""
    ckpt = load_checkpoint(model_ref, store, ensemble_ok=True)
    if ckpt.model.is_classifier:
        if template:
            raise UserError(f"{model_ref} is a classifier; --template applies to language models")
        from llmstages.stages.classify import evaluate_classifier
        return evaluate_classifier(ckpt, paths, limit=limit, console=console, threshold=threshold)
    if threshold is not None:
        raise UserError(f"{model_ref} is a language model; --threshold applies to classifiers")
    if ckpt.meta.get("task") == "instruct" or template:
        from llmstages.stages.instruct import evaluate_instructions
        return evaluate_instructions(ckpt, paths, limit=limit, console=console, template=template)
    return evaluate_text(ckpt, paths, limit=limit)
