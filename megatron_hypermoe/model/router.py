"""megatron-core's top-k router, with capacity applied after it so the top-k selection survives.

:class:`TopKRouterBeforeCapacity` is megatron-core's ``TopKRouter`` (score function, z-loss,
group-limited top-k, expert bias, aux losses: all megatron's own code, configured by the
config) with three things done after megatron's ``routing()``:

- capacity: megatron applies token dropping inside ``routing()``, so the routing map it returns
  is the map AFTER dropping (and with ``moe_pad_expert_input_to_capacity``, padded with tokens
  that never chose the expert). HyperMoE's "unselected experts" are those the router's top-k did
  not pick, before any dropping (the authors' code): a token its expert dropped still gets the
  HyperExpert of its top-k selection. So the router runs megatron's routing with capacity
  deferred, keeps that top-k map in :attr:`topk_map` (read by ``SidePathMoELayer.route``), then
  drops with megatron's own ``apply_router_token_dropping``. The dispatcher and experts see
  exactly what megatron's router would have given them.
- Megatron-DeepSpeed's capacity options: a different factor in evaluation
  (``moe_eval_capacity_factor``) and a minimum capacity per expert (``moe_min_capacity``).
- ``moe_router_renormalize``: divide each token's selected weights by their sum over its top-k
  selection (before dropping, as megatron's post-softmax gates are), times
  ``moe_router_topk_scaling_factor`` if set. With pre-softmax routing this gives exactly the
  gates of post-softmax routing, which megatron-core refuses for top-1; a top-1 gate is then
  exactly 1 and the router learns from the load-balancing loss only, as in Mixtral and the
  authors' GPT-2 code. The aux loss stays attached: its autograd node sits before the division.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity
from megatron.core.transformer.moe.router import TopKRouter


def capacity_factor_with_minimum(factor: float, min_capacity, num_tokens: int, topk: int,
                                 num_experts: int) -> float:
    """The factor for which megatron's capacity, ceil(tokens x topk / experts x factor), is
    max(that capacity, ``min_capacity``): DeepSpeed's rule (``_capacity`` in sharded_moe)."""
    if not min_capacity or get_capacity(num_tokens * topk, num_experts, factor) >= min_capacity:
        return factor
    # ceil(T k / E x f) == min_capacity for f = (min_capacity - 1/2) E / (T k): half a token of
    # margin either side, so rounding cannot move the ceiling.
    return (min_capacity - 0.5) * num_experts / (num_tokens * topk)


class TopKRouterBeforeCapacity(TopKRouter):
    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        # megatron's routing() reads the capacity from self.config: give it a view without
        # capacity (a shallow copy, so the MoE layer's dispatcher still sees the real one).
        self.config = copy.copy(config)
        self.config.moe_expert_capacity_factor = None
        self.config.moe_pad_expert_input_to_capacity = False
        self.capacity_factor = config.moe_expert_capacity_factor
        self.eval_capacity_factor = getattr(config, "moe_eval_capacity_factor", None)
        self.min_capacity = getattr(config, "moe_min_capacity", None)
        self.pad_to_capacity = config.moe_pad_expert_input_to_capacity
        self.drop_policy = config.moe_token_drop_policy
        self.renormalize = getattr(config, "moe_router_renormalize", False)
        self.topk_map = None  # [tokens, experts]: the last forward's top-k selection

    def current_capacity_factor(self, num_tokens: int):
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor is None:
            return None
        return capacity_factor_with_minimum(factor, self.min_capacity, num_tokens, self.topk,
                                            self.num_experts)

    def routing(self, logits, padding_mask=None):
        probs, topk_map = super().routing(logits, padding_mask=padding_mask)
        self.topk_map = topk_map
        factor = self.current_capacity_factor(topk_map.shape[0])
        routing_map = topk_map
        if factor is not None:
            # (the "probs" policy ranks by megatron's weights: a renormalised top-1 gate is 1)
            _, routing_map = apply_router_token_dropping(
                probs, topk_map, router_topk=self.topk, capacity_factor=factor,
                drop_policy=self.drop_policy, pad_to_capacity=self.pad_to_capacity)
        if self.renormalize:
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if self.config.moe_router_topk_scaling_factor:
                probs = probs * self.config.moe_router_topk_scaling_factor
        if factor is None:
            return probs, topk_map
        if self.enable_expert_bias and torch.is_grad_enabled():
            # megatron counts the tokens each expert receives after dropping; super() counted
            # the top-k selection.
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0) - topk_map.sum(dim=0)
        return probs * routing_map, routing_map


def finish_router_step(model, config) -> None:
    """After a step's micro-batches: what megatron's finalize_model_grads does for routers
    (the expert-bias update from the step's token counts, summed over TP x DP ranks; the reset
    of the per-step counters of expert bias and global_aux_loss)."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    if config.num_moe_experts is None:
        return
    if config.moe_router_enable_expert_bias:
        _update_router_expert_bias([model], config)
    reset_model_temporary_tensors(config, [model])

