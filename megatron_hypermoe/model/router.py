"""megatron-core's top-k router, optionally with the selected experts' weights renormalised.

``moe_router_renormalize``: after megatron's routing (z-loss, top-k, aux-loss attachment),
divide each token's k weights by their sum. With pre-softmax routing this gives exactly the
gates of post-softmax routing (a softmax over the k selected logits), which megatron-core refuses
for top-1; a top-1 gate is then exactly 1 and the router learns from the load-balancing loss
only, as in Mixtral and the authors' GPT-2 code. The aux loss stays attached: its autograd node
sits before the division.
"""

from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter


class RenormalisingTopKRouter(TopKRouter):
    def routing(self, logits, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.config.moe_router_renormalize:
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return probs, routing_map
