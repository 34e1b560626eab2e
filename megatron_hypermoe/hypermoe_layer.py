"""HyperMoELayer: megatron-core's MoELayer plus the HyperExpert side path.

Router, token dispatcher and experts are megatron-core's, untouched. The layer records the
pre-dispatch input and the local routing map when it routes, and adds the HyperExpert output after
the combine. Under expert parallelism this means the HyperExpert runs on each token's home rank,
on that rank's tokens, with no extra collective.

The hypernetwork is shared by every layer and owned by the model
(:class:`megatron_hypermoe.model.HyperMoEGPTModel`), which attaches it after building the layers;
the layer keeps a plain reference so the shared parameters appear once in ``state_dict``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_hypermoe.hyper_expert import hyper_expert_output
from megatron_hypermoe.hypernetwork import ExpertSelectionEmbedding, HyperNetwork


class HyperMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.selection = ExpertSelectionEmbedding(config)
        self.__dict__["_hypernetwork"] = None  # not a submodule: the model owns it
        self._routed = None
        self.last_hyper_output_rms = None  # for logging: RMS of y_hyper in the last forward

    def attach_hypernetwork(self, hypernetwork: HyperNetwork) -> None:
        self.__dict__["_hypernetwork"] = hypernetwork

    @property
    def hypernetwork(self) -> Optional[HyperNetwork]:
        return self.__dict__["_hypernetwork"]

    @property
    def layer_index(self) -> int:
        """0-based global layer index into the hypernetwork's layer embedding."""
        return self.layer_number - 1

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._routed = (hidden_states, routing_map)
        return probs, routing_map

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        output = super().postprocess(output, shared_expert_output)
        hidden_states, routing_map = self._routed
        self._routed = None
        y_hyper = self.hyper_expert(hidden_states, routing_map)
        self.last_hyper_output_rms = y_hyper.detach().float().pow(2).mean().sqrt()
        return output + y_hyper.view_as(output)

    def hyper_expert(self, hidden_states: torch.Tensor, routing_map: torch.Tensor):
        """y_hyper for [..., hidden] inputs and their [tokens, experts] routing map."""
        if self.hypernetwork is None:
            raise RuntimeError(
                "HyperMoELayer has no hypernetwork: build the model with build_gpt_model() or call "
                "attach_hypernetwork() before forward"
            )
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return hyper_expert_output(
            x,
            routing_map,
            self.selection,
            self.hypernetwork,
            self.layer_index,
            impl=self.config.hyper_expert_impl,
            factored_min_sets_fraction=self.config.hyper_factored_min_sets_fraction,
        )
