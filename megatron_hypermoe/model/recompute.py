"""Activation recomputation: Megatron-LM's flags onto megatron-core's own machinery.

The flags set TransformerConfig's ``recompute_granularity``, ``recompute_method``,
``recompute_num_layers`` and ``recompute_modules``, which megatron-core's TransformerBlock
(full: whole layers under ``tensor_parallel.checkpoint``), attention (``core_attn``), dense MLP
(``mlp``) and MoELayer (``moe``) honour. HyperMoE's side path runs inside the MoE layer's
forward (it is added in ``postprocess``), so a full-layer checkpoint and the ``moe`` module both
recompute it. ``--recompute-activations`` (Megatron-LM) and ``--checkpoint-activations`` /
``--checkpoint-num-layers`` (Megatron-DeepSpeed) are aliases onto the same fields.

Recomputation changes no weight, so it is not part of a checkpoint's shape: a run may resume
with another setting.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")
# What megatron-core 0.16.1's TransformerConfig accepts in recompute_modules.
MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
DEFAULT_MODULES = ["core_attn"]  # megatron-core's default for selective



def recompute_modules_flag(config):
    """--recompute-modules as a run of ``config`` would pass it (args_for_model): megatron-core
    fills recompute_modules (core_attn) even when nothing is recomputed selectively."""
    if config.recompute_granularity != "selective":
        return None
    return list(config.recompute_modules)


def recomputes_moe_layers(config) -> bool:
    """Whether megatron re-runs the MoE layers' forward in backward (a full-layer checkpoint of
    any layer, or the selective ``moe`` / ``mlp`` modules)."""
    if config.recompute_granularity == "full":
        return True
    return config.recompute_granularity == "selective" and bool(
        {"moe", "mlp"} & set(config.recompute_modules or ()))


def in_recompute_replay() -> bool:
    """True while megatron's checkpoint re-runs a forward during backward. Its flag is set in
    both passes; only the replay runs with grad enabled (the first pass runs under no_grad).
    Observers of forward passes (expert-load counts) skip the replay, or they count twice."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and torch.is_grad_enabled()
