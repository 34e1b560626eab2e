"""Initialise every parameter from its GLOBAL identity, so one seed gives one model in any layout.

megatron-core draws weights from per-rank RNG streams, so the same seed gives different models
under different tensor/expert-parallel layouts. Here each parameter is drawn whole from a
generator seeded by (seed, global name), where the global name numbers experts by global expert
id, and then the local shard is cut out. EP=2 and EP=1 runs therefore start from identical
weights, which is what makes layout-equivalence checks (and layout comparisons by users) possible.

The distributions follow megatron's defaults: normal(0, init_method_std) for weights,
normal(0, init_method_std / sqrt(2 * num_layers)) for the output projections of attention and
MLP, ones for norm weights, zeros for biases; the HyperNetwork's four heads keep the paper's
hyperfanin init.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from megatron_hypermoe.model.config import HyperMoEConfig
from megatron_hypermoe.model.hypernetwork import init_head_weight_
from megatron_hypermoe.parallel.experts import global_name_function, tensor_parallel_size_and_rank
from megatron_hypermoe.parallel.tensor_sharding import shard

_HYPERNET_HEAD = re.compile(r"hypernetwork\.(down_weight|down_bias|up_weight|up_bias)\.weight$")
_OUTPUT_PROJECTION = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def _name_seed(seed: int, global_name: str) -> int:
    return zlib.crc32(f"{seed}:{global_name}".encode()) & 0x7FFFFFFF


def _full_shape(param: torch.nn.Parameter, tp_size: int):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _draw(global_name: str, shape, config: HyperMoEConfig, generator) -> torch.Tensor:
    if global_name.endswith(".bias") or global_name.endswith("adapter.up.weight"):
        return torch.zeros(shape)  # the static adapter starts with no output, as HyperMoE
    if "layernorm" in global_name or global_name.endswith("norm.weight"):
        return torch.ones(shape)
    head = _HYPERNET_HEAD.search(global_name)
    if head:
        return init_head_weight_(torch.empty(shape), head.group(1), config, generator)
    std = config.init_method_std
    if _OUTPUT_PROJECTION.search(global_name):
        std = std / math.sqrt(2.0 * config.num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _assign_by_global_name(model: torch.nn.Module, config: HyperMoEConfig, full_tensor) -> None:
    """Set every parameter to its shard of ``full_tensor(global_name, full_shape)``."""
    to_global = global_name_function(config)
    for name, param in model.named_parameters():
        global_name = to_global(name)
        tp_size, tp_rank = tensor_parallel_size_and_rank(name)
        full = full_tensor(global_name, _full_shape(param, tp_size))
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        local = shard(full, name, dim, tp_size, tp_rank, config.gated_linear_unit)
        param.copy_(local.to(param.dtype))


@torch.no_grad()
def initialize_from_global_names(model: torch.nn.Module, config: HyperMoEConfig, seed: int):
    """Overwrite every parameter of ``model`` from (seed, global name); layout-independent."""

    def draw(global_name, shape):
        generator = torch.Generator().manual_seed(_name_seed(seed, global_name))
        return _draw(global_name, shape, config, generator)

    _assign_by_global_name(model, config, draw)


@torch.no_grad()
def load_global_state(model: torch.nn.Module, config: HyperMoEConfig, state: dict,
                      fallback_seed: int = None):
    """Overwrite every parameter from a full state dict keyed by global names (a converted
    checkpoint), in any TP/EP layout. Names missing from ``state`` are drawn from
    ``fallback_seed`` (fresh router and HyperMoE path when upcycling); without one they are an
    error."""

    def take(global_name, shape):
        if global_name in state:
            tensor = state[global_name]
            if list(tensor.shape) != list(shape):
                raise ValueError(f"{global_name}: shape {list(tensor.shape)} in the source, "
                                 f"{list(shape)} in the model")
            return tensor
        if fallback_seed is None:
            raise KeyError(f"{global_name} is missing from the source weights")
        generator = torch.Generator().manual_seed(_name_seed(fallback_seed, global_name))
        return _draw(global_name, shape, config, generator)

    _assign_by_global_name(model, config, take)


# What the side path's output is a product of, last: zero, it makes the output exactly zero.
_SIDE_PATH_OUTPUT = re.compile(r"(hypernetwork\.(up_weight|up_bias)|\.adapter\.up)\.(weight|bias)$")


@torch.no_grad()
def zero_side_path_output_(model: torch.nn.Module) -> None:
    """Make the side path's output exactly zero, so that a model it is added to (an MoE
    upcycled into HyperMoE or into the static-adapter variant) computes what it did: the heads
    that generate the HyperExpert's up projection and output bias (W_up(h) = b_up(h) = 0), and
    the static adapter's up projection. Their gradients are not zero (the bottleneck's
    activations are not), so the first step moves them, as LoRA's B = 0 does; every other part
    of the side path keeps its initialisation (``hyper_init`` for the other two heads)."""
    for name, param in model.named_parameters():
        if _SIDE_PATH_OUTPUT.search(name):
            param.zero_()
