"""The command-line boundary: every flag of pretrain_gpt_hypermoe.py (Megatron-LM's names), its
parsing, its checks, and the Megatron-LM and DeepSpeed tables, in this package only.

``arguments.run_config`` turns the parsed flags into a frozen, typed
:class:`~megatron_hypermoe.training.config.RunConfig`; nothing below this package reads flags.
The entry points (``pretrain_gpt_hypermoe.py``, ``tools/``, ``benchmarks/``) parse here and hand
configs down.
"""
