"""Hugging Face conversion: configuration and modeling files (copied into exports), the name
mapping, export, import, and the tokenizer that travels with a model."""
