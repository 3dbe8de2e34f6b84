"""Models' own chat templates (finetune.template=hf): rendered exactly as transformers'
apply_chat_template renders them, the end-of-turn token found, a conversation split into prompt and reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from llmstages.errors import UserError  # noqa: E402
from llmstages.templates import ChatTemplate, chat_tokenizer, format_prompt, split_conversation  # noqa: E402
from llmstages.tokenizer import Tokenizer, train_bpe  # noqa: E402

# ChatML with a default system message (as SmolLM2-Instruct's and Qwen2.5's templates have one).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's shape: bos_token, headers, trimmed content, an end-of-turn token, loop controls.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Block tags on their own lines (trim_blocks / lstrip_blocks matter), tojson, and eos_token after replies.
BLOCKS = """{% for message in messages %}
    {% if message.role == 'assistant' %}
{{ 'A: ' + message.content + eos_token }}
    {% else %}
{{ message.role | upper }}: {{ message.content | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "blocks": BLOCKS}
ENDS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "blocks": "<|endoftext|>"}
MESSAGES = [
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \"there\" ü"},
     {"role": "assistant", "content": "  Hello!  "}, {"role": "user", "content": "Again?"},
     {"role": "assistant", "content": "Yes."}],
]


def tokenizer_folder(root: Path, template: str) -> Path:
    folder = root / "tok"
    folder.mkdir(exist_ok=True)
    tok = train_bpe(["Hello world, a small text for a small tokenizer. Name a color. Blue."] * 10, 300)
    tok.inner.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"])
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>",
        "chat_template": template}))
    return folder


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(name, generation_prompt, tmp_path):
    folder = tokenizer_folder(tmp_path, TEMPLATES[name])
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = ChatTemplate.of(Tokenizer.from_file(folder))
    for messages in MESSAGES:
        history = messages[:-1] if generation_prompt else messages
        expected = theirs.apply_chat_template(history, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.render(history, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_turn_and_the_reply_split(name, tmp_path):
    tok = Tokenizer.from_file(tokenizer_folder(tmp_path, TEMPLATES[name]))
    template = ChatTemplate.of(tok)
    assert template.end_of_turn == ENDS[name]
    assert chat_tokenizer("hf", tok).eot == ENDS[name] and chat_tokenizer("alpaca", tok) is tok
    for messages in MESSAGES:
        prompt, reply = split_conversation(template, messages)
        full = template.render(messages, add_generation_prompt=False)
        # The reply is the assistant's text as the template writes it; the end-of-turn token follows.
        assert full.startswith(prompt + reply + ENDS[name])
        assert reply.strip() == messages[-1]["content"].strip()
    assert format_prompt(template, "Name a color.") == template.render(
        [{"role": "user", "content": "Name a color."}], add_generation_prompt=True)


def test_template_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no chat_template"):
        ChatTemplate.of(train_bpe(["abc"] * 5, 260))
    tok = Tokenizer.from_file(tokenizer_folder(tmp_path, LLAMA3))
    with pytest.raises(ValueError, match="bad role"):
        ChatTemplate.of(tok).render([{"role": "tool", "content": "x"}], add_generation_prompt=False)
    broken = Tokenizer.from_file(tokenizer_folder(tmp_path, "{% for m in messages %}"))
    with pytest.raises(UserError, match="not a valid Jinja template"):
        ChatTemplate.of(broken).render([], add_generation_prompt=True)
    plain = Tokenizer.from_file(tokenizer_folder(tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}"))
    with pytest.raises(UserError, match="no special token after a reply"):
        _ = ChatTemplate.of(plain).end_of_turn
