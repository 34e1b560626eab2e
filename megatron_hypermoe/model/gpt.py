"""GPT models with HyperMoE, MoE or dense MLPs, built from megatron-core's layer specs.

``get_block_spec(config)`` gives each layer of this pipeline stage its spec: a dense layer or
an MoE layer of the variant, by ``moe_layer_pattern`` (megatron's ``moe_layer_freq``).
``get_layer_spec(config, moe)`` returns megatron-core's local (torch-only) GPT layer spec with
the MLP chosen by ``config.moe_type``, the core attention by ``config.core_attention_backend``
(torch's SDPA, model/attention.py, or megatron's DotProductAttention) and the experts by
``config.moe_grouped_gemm`` (model/grouped_experts.py, or megatron's SequentialMLP); for
``hypermoe`` (``moe_adapter``) it swaps megatron's MoELayer for HyperMoELayer (AdapterMoELayer)
and leaves every other submodule alone. ``build_gpt_model`` builds the GPTModel (RoPE
positions) and, for ``hypermoe``, the one shared hypernetwork.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_hypermoe.model.adapter_layer import AdapterMoELayer
from megatron_hypermoe.model.attention import core_attention_class
from megatron_hypermoe.model.config import SIDE_PATH_VARIANTS, HyperMoEConfig, moe_layer_pattern
from megatron_hypermoe.model.grouped_experts import experts_class
from megatron_hypermoe.model.hyper_expert import shared_generation
from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.hypernetwork import HyperNetwork
from megatron_hypermoe.model.recompute import recomputes_moe_layers
from megatron_hypermoe.model.router import TopKRouterBeforeCapacity
from megatron_hypermoe.parallel.sequence_parallel import mark_sequence_parallel

SIDE_PATH_LAYERS = {"hypermoe": HyperMoELayer, "moe_adapter": AdapterMoELayer}
assert tuple(SIDE_PATH_LAYERS) == SIDE_PATH_VARIANTS


def get_block_spec(config: HyperMoEConfig) -> TransformerBlockSubmodules:
    """The layer specs of this pipeline stage's layers, by ``moe_layer_pattern`` (megatron's
    ``moe_layer_freq``): an MoE layer of the variant or a dense layer, as megatron-core's
    ``get_gpt_decoder_block_spec`` cuts them, with the layers' own norm as the final norm."""
    pattern = moe_layer_pattern(config)
    specs = {moe: get_layer_spec(config, moe) for moe in set(pattern)}
    offset = get_transformer_layer_offset(config)
    local = pattern[offset:offset + get_num_layers_to_build(config)]
    return TransformerBlockSubmodules(layer_specs=[specs[moe] for moe in local],
                                      layer_norm=specs[pattern[0]].submodules.input_layernorm)


def get_layer_spec(config: HyperMoEConfig, moe: bool = True) -> ModuleSpec:
    """megatron-core's local GPT layer spec (a dense layer where ``moe`` is False or the
    variant is ``dense``); for the MoE variants, its MLP swapped for the variant's layer class,
    its router for megatron's TopKRouter that applies capacity after recording the top-k
    selection (and renormalises with ``moe_router_renormalize``), and its experts for the
    grouped-GEMM ones with ``moe_grouped_gemm``. Every other submodule (the shared experts
    included) stays megatron's."""
    moe = moe and config.moe_type != "dense"
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=False,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
    )
    spec = _with_core_attention(spec, core_attention_class(config))
    if not moe:  # (megatron-core deprecates an MLP built without its width)
        mlp = dataclasses.replace(spec.submodules.mlp, params={
            **spec.submodules.mlp.params, "ffn_hidden_size": config.ffn_hidden_size})
        return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
    mlp = spec.submodules.mlp
    experts = dataclasses.replace(mlp.submodules.experts, module=experts_class(config))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, router=TopKRouterBeforeCapacity, experts=experts))
    side_path_layer = SIDE_PATH_LAYERS.get(config.moe_type)
    if side_path_layer is not None:
        mlp = dataclasses.replace(mlp, module=side_path_layer)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))


def kernels_line(config: HyperMoEConfig) -> str:
    """One line naming the attention and experts modules :func:`get_layer_spec` picked."""
    attention = core_attention_class(config)
    line = f"core attention: {attention.__name__} (--attention-backend " \
           f"{config.core_attention_backend})"
    if config.moe_type != "dense":
        experts = experts_class(config)
        line += f"; experts: {experts.__name__} (" + (
            "grouped GEMM)" if experts is not SequentialMLP else "a loop over local experts)")
    return line


def _with_core_attention(spec: ModuleSpec, core_attention) -> ModuleSpec:
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    self_attention=attention))


class HyperMoEGPTModel(GPTModel):
    """GPTModel that owns the hypernetwork shared by all its HyperMoE layers, and lets them
    generate their HyperExperts together in each forward
    (:func:`~megatron_hypermoe.model.hyper_expert.shared_generation`)."""

    def __init__(self, config: HyperMoEConfig, **gpt_kwargs):
        super().__init__(config=config, **gpt_kwargs)
        self.hypernetwork = HyperNetwork(config)
        for layer in self.hypermoe_layers():
            layer.attach_hypernetwork(self.hypernetwork)

    def hypermoe_layers(self):
        return [m for m in self.modules() if isinstance(m, HyperMoELayer)]

    def forward(self, *args, **kwargs):
        # Recomputed layers generate their own HyperExperts: a shared generation would keep
        # for backward what recomputation is there to drop.
        if recomputes_moe_layers(self.config):
            return super().forward(*args, **kwargs)
        layers = [(layer.selection, layer.layer_index) for layer in self.hypermoe_layers()]
        with shared_generation(self.hypernetwork, layers):
            return super().forward(*args, **kwargs)


class _DropUnknownMlpWarning(logging.Filter):
    # TransformerLayer warns "Unknown MLP type" for any MoELayer subclass and then builds it with
    # the default process groups, which is what we want: silence only that line.
    def filter(self, record):
        return not record.getMessage().startswith("Unknown MLP type")


@contextlib.contextmanager
def _quiet_unknown_mlp_warning():
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    log_filter = _DropUnknownMlpWarning()
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def build_gpt_model(config: HyperMoEConfig, vocab_size: int, max_sequence_length: int,
                    **gpt_kwargs) -> GPTModel:
    """Build the model for ``config.moe_type``. Needs megatron's parallel state initialised."""
    kwargs = dict(
        transformer_layer_spec=get_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        share_embeddings_and_output_weights=False,
    )
    kwargs.update(gpt_kwargs)
    model_class = HyperMoEGPTModel if config.moe_type == "hypermoe" else GPTModel
    with _quiet_unknown_mlp_warning():
        model = model_class(config=config, **kwargs)
    for name, module in model.named_modules():
        if name.endswith(("q_layernorm", "k_layernorm")):
            # One weight for every head: each tensor-parallel rank's gradient covers its own
            # heads, so it is summed over the TP group like a sequence-parallel weight's (megatron
            # marks these only under sequence parallelism).
            mark_sequence_parallel(module, True)
    # megatron-core builds its layers on the GPU unless use_cpu_initialization; torch's own
    # modules (RMSNorm, the hypernetwork, the selection embeddings) on the default device.
    return model.to(model_device(config))


def model_device(config: HyperMoEConfig) -> torch.device:
    """The one device a built model lives on: where megatron-core puts its parameters."""
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device(torch.cuda.current_device())


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """megatron's [1, 1, s, s] boolean mask, True where attention is NOT allowed.

    Pass it explicitly: without a mask megatron-core builds its default on "cuda".
    """
    ones = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1).view(1, 1, seq_length, seq_length)
