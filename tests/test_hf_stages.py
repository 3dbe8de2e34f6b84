"""Every stage from an hf: Llama-family base (a tiny random Qwen2 saved by transformers, with a ChatML
chat template): instruction fine-tuning with the model's own template (all weights, last blocks, LoRA ->
merge), classification, generate --chat, chat, evaluate, and export back to transformers as qwen2."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

transformers = pytest.importorskip("transformers")

from conftest import FP64_TOL, float64  # noqa: E402

from llmstages.checkpoint import load_checkpoint  # noqa: E402
from llmstages.config import build_recipe  # noqa: E402
from llmstages.data.prepared import PreparedDataset  # noqa: E402
from llmstages.interop import export_hf  # noqa: E402
from llmstages.stages.chat import Sampling, chat  # noqa: E402
from llmstages.stages.finetune import finetune  # noqa: E402
from llmstages.store import Store  # noqa: E402
from llmstages.templates import ChatTemplate  # noqa: E402
from llmstages.tokenizer import train_bpe  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
COLORS = ["red", "green", "blue", "yellow"]


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def instruct_rows(n: int = 24) -> list[dict]:
    return [{"instruction": f"Name color {i}.", "input": "", "output": f"The color is {COLORS[i % 4]}."}
            for i in range(n)]


def spam_rows(n: int = 40) -> list[str]:
    return [f"{'spam' if i % 2 else 'ham'}\t{'WIN a prize now call' if i % 2 else 'see you at lunch'} {i}"
            for i in range(n)]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny random Qwen2ForCausalLM (GQA, q/k/v biases, untied head) with a ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    texts = [f"{r['instruction']} {r['output']}" for r in instruct_rows()] + [t.split("\t")[1] for t in spam_rows()]
    tok = train_bpe(texts * 5, 300)
    tok.inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=96, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML}))
    return folder


def recipe(task: str, source: Path, base: Path, run: str, **finetune_settings):
    raw = {"task": task, "run": run, "init_from": f"hf:{base}",
           "data": {"source": [str(source)], "val_fraction": 0.2, "split_seed": 1},
           "train": {"max_steps": 3, "micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 0,
                     "eval_every": 0, "eval_batches": 1, "log_every": 1, "lr": 1e-2, "min_lr": 1e-3},
           "finetune": {"eval_samples": 0, **finetune_settings}}
    if task == "classify":
        raw["data"].update(columns=["label", "text"], format="tsv", test_fraction=0.2)
    return build_recipe(raw)


def logits_match_transformers(ckpt, out: Path, idx: torch.Tensor, cls) -> None:
    theirs = cls.from_pretrained(out).eval()
    with float64(ckpt.model.eval(), theirs):
        ours = ckpt.model(idx) if not ckpt.model.is_classifier else \
            ckpt.model(idx, last_index=torch.full((idx.size(0),), idx.size(1) - 1))
        torch.testing.assert_close(theirs(idx).logits, ours, atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("trainable", ["all", "last_blocks:1", "lora"])
def test_instruct_with_the_models_chat_template(trainable, hf_base, tmp_path, store_dir):
    source = tmp_path / "inst.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows()))
    store = Store(store_dir)
    finetune(recipe("instruct", source, hf_base, "inst", template="hf", trainable=trainable), store, console=quiet())
    ckpt = load_checkpoint("inst", store)
    assert ckpt.meta["template"] == "hf" and ckpt.tokenizer.eot == "<|im_end|>"
    assert ckpt.model.config.hf_model_type == "qwen2" and ckpt.tokenizer.chat_template == CHATML

    # Prepared records: the rendered prompt (masked), the reply, then the end-of-turn token.
    data = PreparedDataset.open(next((store_dir / "data").iterdir()))
    split = data.records("train")
    row, ids = split.texts()[0], split.example(0).tolist()
    prompt = ChatTemplate.of(ckpt.tokenizer).render([{"role": "user", "content": row["instruction"]}],
                                                    add_generation_prompt=True)
    n_prompt = len(ckpt.tokenizer.encode(prompt))
    assert int(split.prompt_lens[0]) == n_prompt
    assert ids[:n_prompt] == ckpt.tokenizer.encode(prompt) and ids[-1] == ckpt.tokenizer.eot_id
    assert ckpt.tokenizer.decode(ids[n_prompt:-1]) == row["output"]

    if trainable == "lora":
        from llmstages.stages.merge import merge
        merge("inst", store, run="merged")
        ckpt = load_checkpoint("merged", store)
        assert ckpt.model.config.lora_rank == 0 and ckpt.meta["template"] == "hf"
    out = export_hf(ckpt, tmp_path / "export", force=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["eos_token_id"] == ckpt.tokenizer.eot_id
    logits_match_transformers(ckpt, out, torch.randint(0, 300, (2, 12)), transformers.AutoModelForCausalLM)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "Name color 3."}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt.replace(
        row["instruction"], "Name color 3.")
    assert theirs.eos_token == "<|im_end|>"


def test_classify_from_an_hf_base_and_export(hf_base, tmp_path, store_dir, capsys, monkeypatch):
    from llmstages.cli import main
    source = tmp_path / "sms.tsv"
    source.write_text("\n".join(spam_rows()) + "\n")
    store = Store(store_dir)
    # packed, as finetune-spam-smollm2 is: the texts share rows (positions restart, attention per text)
    finetune(recipe("classify", source, hf_base, "clf", trainable="last_blocks:1", packing=True), store,
             console=quiet())
    ckpt = load_checkpoint("clf", store)
    assert ckpt.model.is_classifier and ckpt.model.config.class_names == ["ham", "spam"]
    out = export_hf(ckpt, tmp_path / "export", force=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]
    logits_match_transformers(ckpt, out, torch.randint(1, 300, (2, 10)),
                              transformers.AutoModelForSequenceClassification)
    capsys.readouterr()
    assert main(["classify", "clf", "WIN a prize now call", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["evaluate", "clf", "--data", str(source), "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


def test_generate_chat_evaluate_and_chat_on_the_hf_model_itself(hf_base, tmp_path, capsys, monkeypatch):
    from llmstages.cli import main
    source = tmp_path / "inst.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows(4)))
    capsys.readouterr()
    assert main(["evaluate", f"hf:{hf_base}", "--data", str(source), "--template", "hf", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["template"] == "hf" and 0 <= scores["rouge_l"] <= 1 and scores["loss"] > 0
    assert main(["generate", f"hf:{hf_base}", "Name color 1.", "--chat", "-t", "0", "-n", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "Name color 1." and result["tokens"] >= 1
    assert main(["generate", f"hf:{hf_base}", "x", "--chat", "--raw"]) == 2

    ckpt = load_checkpoint(f"hf:{hf_base}")
    seen: list[str] = []
    queue = ["Hello", "Again", "/quit"]
    replies = chat(ckpt, Sampling(max_new_tokens=4, temperature=0.0), read_line=lambda p: queue.pop(0),
                   write=seen.append, console=quiet())
    assert replies == 2 and ckpt.tokenizer.eot == "<|im_end|>"


def test_dry_run_estimates_memory_and_warns_before_it_would_not_fit(hf_base, tmp_path, store_dir, monkeypatch):
    from llmstages.model import num_params
    source = tmp_path / "inst.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows()))
    console = quiet()
    figures = finetune(recipe("instruct", source, hf_base, "dry", template="hf"), Store(store_dir), dry_run=True,
                       console=console)
    params = figures["parameters"]
    assert figures["fits"] is True and figures["estimated weights (MiB)"] == round(params * 4 / (1 << 20), 1)
    assert figures["estimated optimizer (MiB)"] == round(params * 8 / (1 << 20), 1)
    assert figures["estimated activations (MiB)"] > 0
    lora = finetune(recipe("instruct", source, hf_base, "dry", template="hf", trainable="lora"), Store(store_dir),
                    dry_run=True, console=quiet())
    assert lora["estimated optimizer (MiB)"] < figures["estimated optimizer (MiB)"]
    monkeypatch.setattr("llmstages.dryrun.free_memory", lambda device: 1 << 20)  # 1 MiB free
    figures = finetune(recipe("instruct", source, hf_base, "dry", template="hf"), Store(store_dir), dry_run=True,
                       console=console)
    assert figures["fits"] is False and "would not fit" in console.file.getvalue()
    assert "measured tokens/s" not in figures and num_params
    assert not (store_dir / "runs" / "dry").exists()
