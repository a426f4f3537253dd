"""Readers and writers for adapter checkpoints made by other libraries (``peft``: Hugging Face PEFT)."""
