"""What ships inside a Hugging Face export (``configuration_hypermoe.py``, ``modeling_hypermoe.py``:
they import torch and transformers only) and the megatron <-> Hugging Face name map."""
