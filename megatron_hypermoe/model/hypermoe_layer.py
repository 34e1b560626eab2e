"""HyperMoELayer: megatron-core's MoELayer plus the HyperExpert side path.

Router, token dispatcher and experts are megatron-core's, untouched (see
:class:`~megatron_hypermoe.model.side_path.SidePathMoELayer`, which records the routing and adds
the side path after the combine). Under expert parallelism the HyperExpert therefore runs on each
token's home rank, on that rank's tokens, with no extra collective.

The hypernetwork is shared by every layer and owned by the model
(:class:`megatron_hypermoe.model.HyperMoEGPTModel`), which attaches it after building the layers;
the layer keeps a plain reference so the shared parameters appear once in ``state_dict``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_hypermoe.model.hyper_expert import hyper_expert_output
from megatron_hypermoe.model.hypernetwork import ExpertSelectionEmbedding, HyperNetwork
from megatron_hypermoe.model.side_path import SidePathMoELayer


class HyperMoELayer(SidePathMoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.selection = ExpertSelectionEmbedding(config)
        self.__dict__["_hypernetwork"] = None  # not a submodule: the model owns it

    def attach_hypernetwork(self, hypernetwork: HyperNetwork) -> None:
        self.__dict__["_hypernetwork"] = hypernetwork

    @property
    def hypernetwork(self) -> Optional[HyperNetwork]:
        return self.__dict__["_hypernetwork"]

    @property
    def layer_index(self) -> int:
        """0-based global layer index into the hypernetwork's layer embedding."""
        return self.layer_number - 1

    def side_output(self, hidden_states, routing_map):
        return self.hyper_expert(hidden_states, routing_map)

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
            topk=self.config.moe_router_topk,
        )
