"""An MoE layer with a side path: megatron-core's MoELayer plus f(x, selected experts).

Router, token dispatcher and experts stay megatron-core's. The layer records the pre-dispatch
input and the local routing map when it routes, and adds the side path's output after the
combine, so under expert parallelism the side path runs on each token's home rank, on that
rank's tokens, with no extra collective. The routing map it records is the router's top-k
selection before capacity dropping
(:class:`~megatron_hypermoe.model.router.TopKRouterBeforeCapacity`).
Subclasses define :meth:`side_output`:
:class:`~megatron_hypermoe.model.hypermoe_layer.HyperMoELayer` (the HyperExpert, generated from the
unselected experts) and :class:`~megatron_hypermoe.model.adapter_layer.AdapterMoELayer` (a static
adapter, the ablation).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_hypermoe.model.recompute import in_recompute_replay

# The parameters of the side path (the selection embeddings and the shared hypernetwork, or the
# static adapter): what an MoE model lacks of HyperMoE / moe_adapter.
_SIDE_PATH_PARAMETER = re.compile(r"(^|\.)(hypernetwork|selection|adapter)\.")


def is_side_path_parameter(name: str) -> bool:
    return _SIDE_PATH_PARAMETER.search(name) is not None


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square in fp32, as a BLAS dot product: no squared copy (half the time of
    pow(2).mean() for a [2048, 768] output on the CPU)."""
    flat = tensor.detach().float().reshape(-1)
    return (torch.dot(flat, flat) / max(flat.numel(), 1)).sqrt()


class SidePathMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self._routed = None
        # For logging: RMS of the side path's last output, and relative to the experts' output,
        # taken while ``record_statistics`` (the trainer turns it on for the steps it logs:
        # two fp32 passes over [tokens, hidden] per layer).
        self.record_statistics = True
        self.last_side_output_rms = None
        self.last_side_over_experts_rms = None
        # Analysis hook: called (layer, input, routing_map, experts_output, side_output).
        self.output_recorder: Optional[Callable] = None

    def side_output(self, hidden_states: torch.Tensor, routing_map: torch.Tensor):
        """[tokens, hidden] for the [..., hidden] pre-dispatch input and [tokens, experts]
        boolean map of selected experts."""
        raise NotImplementedError

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        # The side path sees the router's top-k selection from before capacity dropping (and
        # padding): a token its expert dropped keeps the side path of what it selected.
        self._routed = (hidden_states, self.router.topk_map)
        return probs, routing_map

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        output = super().postprocess(output, shared_expert_output)
        hidden_states, routing_map = self._routed
        self._routed = None
        side = self.side_output(hidden_states, routing_map).view_as(output)
        if self.record_statistics:
            self.last_side_output_rms = _rms(side)
            self.last_side_over_experts_rms = \
                self.last_side_output_rms / _rms(output).clamp_min(1e-30)
        if self.output_recorder is not None and not in_recompute_replay():
            self.output_recorder(self, hidden_states, routing_map, output, side)
        return output + side


def record_side_path_statistics(model, enabled: bool) -> None:
    """Whether the model's side-path layers take their output statistics in the coming
    forwards."""
    for module in model.modules():
        if isinstance(module, SidePathMoELayer):
            module.record_statistics = enabled
