"""llmstages: prepare data, pretrain a GPT, fine-tune it (instructions or classes), generate."""

__version__ = "0.1.0"
