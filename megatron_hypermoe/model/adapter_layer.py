"""The ablation that isolates the hypernetwork: an MoE plus a STATIC bottleneck adapter.

``moe_type="moe_adapter"``: every MoE layer adds relu(x W_down + b_down) W_up + b_up with learned
weights of the HyperExpert's size r, the same for every token, where HyperMoE generates them from
the unselected experts. W_up starts at zero, so like HyperMoE (whose heads start near zero) the
model starts as the plain MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hypermoe.model.side_path import SidePathMoELayer
from megatron_hypermoe.parallel.sequence_parallel import mark_sequence_parallel


class BottleneckAdapter(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, r = config.hidden_size, config.hyper_adapter_dim
        self.down = nn.Linear(d, r, dtype=config.params_dtype)
        self.up = nn.Linear(r, d, dtype=config.params_dtype)
        with torch.no_grad():
            config.init_method(self.down.weight)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        mark_sequence_parallel(self, config.sequence_parallel)  # sees its sequence slice only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


class AdapterMoELayer(SidePathMoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.adapter = BottleneckAdapter(config)

    def side_output(self, hidden_states, routing_map):
        return self.adapter(hidden_states.reshape(-1, hidden_states.shape[-1]))
