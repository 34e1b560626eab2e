"""Grouped-GEMM experts on torch alone (``--moe-grouped-gemm``).

megatron-core's grouped experts need the ``grouped_gemm`` CUDA package (GroupedMLP) or
Transformer Engine (TEGroupedMLP); without them its experts are ``SequentialMLP``, a Python
loop of two GEMMs per local expert. :class:`GroupedGemmExperts` is that SequentialMLP (the same
per-expert MLP modules, so the same parameters under the same names: checkpoints, the
layout-free format, Hugging Face conversion and initialisation by global name do not change, and
a checkpoint moves between the two bit for bit) with a forward that runs each of the experts'
two linear layers as one grouped GEMM over all local experts
(:class:`~megatron_hypermoe.model.grouped_gemm.GroupedLinear`: ``torch._grouped_mm`` where
torch has it for the device and dtype, a loop over the experts elsewhere). The activation,
routing-weight scaling follow megatron's MLP forward (its unfused path), so the
output and every gradient equal SequentialMLP's up to the GEMMs' rounding.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_hypermoe.errors import ConfigError
from megatron_hypermoe.model import grouped_gemm
from megatron_hypermoe.model.grouped_gemm import GroupBounds, GroupedLinear, colocate

# flag (argparse dest) -> config field, for the MoE config flags


def experts_class(config):
    """The experts submodule of the MoE layer spec."""
    return GroupedGemmExperts if config.moe_grouped_gemm else SequentialMLP


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP's experts, computed as two grouped GEMMs (see the module docstring).
    Linear biases are not offered (this model has none: --disable-bias-linear)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        if config.add_bias_linear:
            raise ConfigError("moe_grouped_gemm: the grouped experts have no linear biases "
                              "(set add_bias_linear=False)")
        super().__init__(num_local_experts, config, submodules, pg_collection)
        for name in ("linear_fc1", "linear_fc2"):  # viewed as [experts, ...] without a copy
            colocate([getattr(expert, name).weight for expert in self.local_experts])

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.num_local_experts == 1 or self.config.fp8 or self.config.fp4:
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # megatron's meaning: top-1 only, checked there
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        num_tokens = x.shape[0]
        fc1 = [expert.linear_fc1 for expert in self.local_experts]
        fc2 = [expert.linear_fc2 for expert in self.local_experts]
        if grouped_gemm.native_grouped_mm(x, x.shape[1], fc1[0].weight.shape[0],
                                          fc2[0].weight.shape[1]):
            # torch._grouped_mm wants 16-byte row strides of the tokens too (the weight
            # gradients' x^T): zero rows join the last expert and are cut off again.
            padding = -num_tokens % (16 // x.element_size())
            if padding:
                x = torch.cat([x, x.new_zeros(padding, x.shape[1])])
                probs = torch.cat([probs, probs.new_zeros(padding)])
            # (no value read on the host: the counts may be on the device)
            ends = torch.cumsum(tokens_per_expert, 0).to(x.device, torch.int32,
                                                         non_blocking=True)
            ends[-1] = x.shape[0]
            groups = GroupBounds(ends, native=True)
        else:  # the counts on the host: megatron's dropless dispatchers keep them there
            groups = GroupBounds.from_sizes(tokens_per_expert.tolist(), x.device, native=False)
        hidden = GroupedLinear.apply(x, groups, *(linear.weight for linear in fc1))
        hidden = self._activation(hidden)
        hidden = (hidden * probs.unsqueeze(-1)).to(hidden.dtype)
        output = GroupedLinear.apply(hidden, groups, *(linear.weight for linear in fc2))
        return output[:num_tokens], None

    def _activation(self, x):
        """megatron's MLP activation (its unfused path), GLU included."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
