"""`llmstages chat`: talk to an instruction model, its replies streamed as they are generated.

The prompt is built with the template stored in the checkpoint, exactly as in training (a model
loaded with hf: that has a chat_template in its tokenizer_config.json uses that one, `hf`):
    alpaca  every message is a fresh instruction: format_prompt("alpaca", message). The Alpaca
            format has no turns, so nothing is remembered between messages.
    chat    the conversation so far (an optional system message, then user / assistant turns) is
            formatted with format_chat; the oldest turns are left out when it would not leave room
            for a reply in the context. /reset starts a new conversation.
    hf      as chat, with the model's own Jinja chat template (templates.ChatTemplate).
A reply ends at <|endoftext|> (hf: the template's end-of-turn token), before a stop string (--stop),
or after max_new_tokens; the reply kept in the conversation is the text shown.

Input: Enter sends the message; a line ending with a backslash continues on the next line.
/reset clears the conversation, /quit (or /exit, or end of input: Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console

from llmstages.checkpoint import Checkpoint
from llmstages.errors import UserError
from llmstages.stages.generate import Sampling, generate_text
from llmstages.templates import TEMPLATES, ChatTemplate, chat_tokenizer, format_chat, format_prompt, resolve

QUIT = ("/quit", "/exit")
RESET = "/reset"
HELP = ("Enter sends; end a line with \\ to continue on the next line. "
        "/reset clears the conversation, /quit or Ctrl-D leaves.")



class Conversation:
    """The history of a chat and the model input for the next user message."""

    def __init__(self, ckpt: Checkpoint, template: str | ChatTemplate, system: str | None, reserve: int):
        self.ckpt, self.template, self.system = ckpt, template, system
        # Room kept free for the reply: the prompt may use at most block_size - reserve tokens.
        self.budget = max(1, ckpt.model.config.block_size - reserve)
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def model_input(self, message: str) -> str:
        if self.template == "alpaca":
            return format_prompt("alpaca", message)
        head = [{"role": "system", "content": self.system}] if self.system else []
        turns = self.turns + [{"role": "user", "content": message}]
        text = format_chat(head + turns, self.template)
        while len(turns) > 1 and len(self.ckpt.tokenizer.encode(text)) > self.budget:
            turns = turns[2:]  # leave out the oldest user / assistant pair
            text = format_chat(head + turns, self.template)
        return text  # a single message longer than the context keeps its end (generate_tokens crops)

    def add(self, message: str, reply: str) -> None:
        if self.template != "alpaca":
            self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]


def chat_template_name(ckpt: Checkpoint) -> str | None:
    """The checkpoint's template; for a model without one (hf:), `hf` when its tokenizer has a chat template."""
    return ckpt.meta.get("template") or ("hf" if ckpt.tokenizer.chat_template else None)


def read_message(read_line: Callable[[str], str | None], prompt: str = "> ", more: str = ". ") -> str | None:
    """One message: lines joined while they end with a backslash; None at end of input."""
    lines: list[str] = []
    while True:
        line = read_line(more if lines else prompt)
        if line is None:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def chat(ckpt: Checkpoint, sampling: Sampling, *, read_line: Callable[[str], str | None],
         write: Callable[[str], None], console: Console, system: str | None = None) -> int:
    """The loop: read a message, stream the reply through `write`; returns the number of replies."""
    if ckpt.model.is_classifier:
        raise UserError(f"{ckpt.ref} is a classifier", hint="use `llmstages classify MODEL TEXT`")
    template = chat_template_name(ckpt)
    if template not in TEMPLATES:
        raise UserError(f"{ckpt.ref} is not an instruction model (its checkpoint has no prompt template)",
                        hint="fine-tune it with `llmstages finetune --task instruct`, or use `llmstages generate`")
    if system and template == "alpaca":
        console.print("[yellow]note:[/yellow] --system is used by the chat template only; this model uses "
                      f"{template}", highlight=False)
    reserve = min(sampling.max_new_tokens, ckpt.model.config.block_size // 2)
    ckpt.tokenizer = chat_tokenizer(template, ckpt.tokenizer)  # hf: a reply ends at the end-of-turn token
    conversation = Conversation(ckpt, resolve(template, ckpt.tokenizer), system, reserve)
    remembers = " (no memory between messages)" if template == "alpaca" else ""
    console.print(f"[bold]chat[/bold] with {ckpt.ref}: template {template}{remembers}, context "
                  f"{ckpt.model.config.block_size} tokens.\n{HELP}", highlight=False)
    replies = 0
    while True:
        message = read_message(read_line)
        if message is None or message.strip() in QUIT:
            return replies
        if message.strip() == RESET:
            conversation.reset()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not message.strip():
            continue
        seed = None if sampling.seed is None else sampling.seed + replies
        try:
            result = generate_text(ckpt, message, model_input=conversation.model_input(message),
                                   **dict(sampling.as_kwargs(), seed=seed), on_text=write)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            write("\n")
            console.print("[dim](reply interrupted)[/dim]")
            continue
        write("\n")
        if result.stop_reason == "max_new_tokens":
            console.print(f"[dim](reply cut at {sampling.max_new_tokens} tokens)[/dim]")
        conversation.add(message, result.completion)
        replies += 1


def terminal_read_line(prompt: str) -> str | None:
    """A line from stdin without its newline, None at end of input. A terminal gets a prompt and line editing."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() history and editing
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")
