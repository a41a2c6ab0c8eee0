"""loraserve: one base model, many LoRA adapters, one batch."""

__version__ = "0.1.0"
