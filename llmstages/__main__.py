from llmstages.cli import run

run()
