"""Converters between our checkpoints and Hugging Face directories (both ways, with upcycling),
and the tokenizer files that travel with a model. What ships INSIDE an export is in ``hf/``."""
