"""Prompt templates for instruction models.

The template a model was fine-tuned with is stored in its checkpoint (`meta.json: template`), so
`generate` and `chat` format prompts exactly as training did. A template turns an instruction (and
optional input) into the prompt text; the response follows it directly and ends with <|endoftext|>.

alpaca: Stanford Alpaca's prompt (Taori et al. 2023), as used in LLMs-from-scratch chapter 7.
chat:   role-marked turns; every finished turn ends with <|endoftext|>, the model's own special token.
"""

from __future__ import annotations

from llmstages.tokenizer import EOT

TEMPLATES = ("alpaca", "chat")

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def format_prompt(template: str, instruction: str, input_text: str = "") -> str:
    """The prompt for one instruction; the model's response is what follows it."""
    if template == "alpaca":
        text = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
        if input_text.strip():
            text += f"\n\n### Input:\n{input_text}"
        return text + "\n\n### Response:\n"
    if template == "chat":
        content = instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"
        return format_chat([{"role": "user", "content": content}])
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def format_chat(messages: list[dict]) -> str:
    """Chat turns as text ending with the assistant marker, ready for the model's next reply.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Assistant turns in the
    history end with <|endoftext|>, as the model was trained to produce.
    """
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        end = EOT if role == "assistant" else ""
        parts.append(f"<|{role}|>\n{content}{end}\n")
    return "".join(parts) + "<|assistant|>\n"


def split_conversation(template: str, messages: list[dict]) -> tuple[str, str]:
    """A chat-style record -> (prompt, response): the response is the last assistant message.

    With the alpaca template, the last user message becomes the instruction (earlier turns are
    prepended as context).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must have role 'assistant' (the response to learn)")
    history, response = messages[:-1], messages[-1]["content"]
    if template == "chat":
        return format_chat(history), response
    users = [m["content"] for m in history if m.get("role") != "assistant"]
    if not users:
        raise ValueError("no user message before the assistant's response")
    return format_prompt("alpaca", users[-1], "\n\n".join(users[:-1])), response
