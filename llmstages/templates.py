"""Prompt templates for instruction models.

The template a model was fine-tuned with is stored in its checkpoint (`meta.json: template`), so
`generate` and `chat` format prompts exactly as training did. A template turns an instruction (and
optional input) into the prompt text; the response follows it directly and ends with <|endoftext|>.

alpaca: Stanford Alpaca's prompt (Taori et al. 2023), as used in LLMs-from-scratch chapter 7.
chat:   role-marked turns; every finished turn ends with <|endoftext|>, the model's own special token.
hf:     the model's own Jinja `chat_template` from its tokenizer_config.json (SmolLM2's and Qwen2's ChatML,
        Llama 3's headers), rendered as transformers' `apply_chat_template` renders it. A reply ends at
        the template's end-of-turn token (e.g. <|im_end|>), which becomes the run's end-of-text: prompt
        masking, the appended end token and stopping follow it.

Where a template name is taken, a `ChatTemplate` (the hf template, resolved with `resolve`) may be given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from llmstages.errors import UserError
from llmstages.tokenizer import EOT, Tokenizer, special_token

TEMPLATES = ("alpaca", "chat", "hf")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's own Jinja chat template, the special tokens it may refer to (bos_token, eos_token, ...)
    and the tokenizer's added special tokens (to find the end of a turn)."""

    source: str
    special: tuple[tuple[str, str], ...]
    added: tuple[str, ...]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "ChatTemplate":
        if not tokenizer.chat_template:
            raise UserError("the model's tokenizer_config.json has no chat_template",
                            hint="use finetune.template=alpaca or chat (our own templates)")
        special = tuple((k, v) for k in SPECIAL_KEYS if (v := special_token(tokenizer.config, k)))
        added = tuple(t.content for t in tokenizer.inner.get_added_tokens_decoder().values() if t.special)
        return cls(tokenizer.chat_template, special, added)

    @cached_property
    def compiled(self):
        try:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("rendering the model's chat template needs jinja2", hint="pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        # The environment transformers renders chat templates in: sandboxed (a template runs no code of
        # ours), block tags trimmed, loop controls, tojson and the two helper functions templates call.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.source)
        except TemplateError as err:
            raise UserError(f"the model's chat_template is not a valid Jinja template ({err})") from None

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The conversation as text; with `add_generation_prompt`, ending where the assistant's reply starts."""
        from jinja2 import TemplateError
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **dict(self.special))
        except TemplateError as err:
            raise ValueError(f"the chat template refused the messages: {err}") from None

    @cached_property
    def end_of_turn(self) -> str:
        """The special token the template writes right after an assistant reply (<|im_end|>, <|eot_id|>...)."""
        marker = "llmstagesREPLYmarker"
        text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                           add_generation_prompt=False)
        tail = text[text.rindex(marker) + len(marker):] if marker in text else ""
        found = sorted((tail.find(t), -len(t), t) for t in self.added if t and t in tail)
        if not found:
            raise UserError("the model's chat template writes no special token after a reply, so the end of a "
                            "turn cannot be learned or detected", hint="use finetune.template=chat or alpaca")
        return found[0][2]


def resolve(template: "str | ChatTemplate", tokenizer: Tokenizer) -> "str | ChatTemplate":
    """A template name, or for `hf` the tokenizer's own ChatTemplate."""
    return ChatTemplate.of(tokenizer) if template == "hf" else template


def chat_tokenizer(template: str, tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer a run with `template` uses: for hf, its end-of-text is the template's end of turn."""
    if template != "hf":
        return tokenizer
    return tokenizer.with_eot(ChatTemplate.of(tokenizer).end_of_turn)

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def format_prompt(template: "str | ChatTemplate", instruction: str, input_text: str = "") -> str:
    """The prompt for one instruction; the model's response is what follows it."""
    if isinstance(template, ChatTemplate):
        content = instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"
        return template.render([{"role": "user", "content": content}], add_generation_prompt=True)
    if template == "alpaca":
        text = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
        if input_text.strip():
            text += f"\n\n### Input:\n{input_text}"
        return text + "\n\n### Response:\n"
    if template == "chat":
        content = instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"
        return format_chat([{"role": "user", "content": content}])
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def format_chat(messages: list[dict], template: "str | ChatTemplate" = "chat") -> str:
    """Chat turns as text ending with the assistant marker, ready for the model's next reply.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Assistant turns in the
    history end with <|endoftext|>, as the model was trained to produce (or, with a ChatTemplate, as
    the model's own template writes them).
    """
    if isinstance(template, ChatTemplate):
        return template.render(messages, add_generation_prompt=True)
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        end = EOT if role == "assistant" else ""
        parts.append(f"<|{role}|>\n{content}{end}\n")
    return "".join(parts) + "<|assistant|>\n"


def split_conversation(template: "str | ChatTemplate", messages: list[dict]) -> tuple[str, str]:
    """A chat-style record -> (prompt, response): the response is the last assistant message.

    With the alpaca template, the last user message becomes the instruction (earlier turns are
    prepended as context).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must have role 'assistant' (the response to learn)")
    history, response = messages[:-1], messages[-1]["content"]
    if isinstance(template, ChatTemplate):
        # The reply is what the whole conversation adds to the history's prompt, up to the end of turn
        # (the run appends that token itself, as its end-of-text).
        prompt = template.render(history, add_generation_prompt=True)
        full = template.render(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the history differently once a reply follows; "
                             "cannot tell the prompt from the reply")
        reply = full[len(prompt):]
        end = reply.rfind(template.end_of_turn)
        return prompt, reply[:end] if end >= 0 else reply
    if template == "chat":
        return format_chat(history), response
    users = [m["content"] for m in history if m.get("role") != "assistant"]
    if not users:
        raise ValueError("no user message before the assistant's response")
    return format_prompt("alpaca", users[-1], "\n\n".join(users[:-1])), response
