"""minigpt: train small GPT language models from scratch, on any language."""

__version__ = "0.1.0"
