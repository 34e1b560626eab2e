"""The HyperExpert output y_hyper for a batch of tokens, in three exact forms.

All three compute, for each token t with input x_t and selected-expert set S(t):

    h_t   = HyperNetwork.hidden(selection(S(t)), layer)
    y_t   = relu(x_t W_down(h_t) + b_down(h_t)) W_up(h_t) + b_up(h_t)

- ``naive``: the paper's code. Generates W_down, W_up for every token (2*d*r values per token,
  kept for backward). The reference the fast forms are tested against; never used for speed.
- ``grouped``: h depends on the token only through S(t), so generate one HyperExpert per distinct
  selected set present (at most C(E, k), bounded by the token count) and apply each to its tokens
  as a grouped matmul.
- ``factored``: never materialise a HyperExpert at all: x W_down(h) = sum_g h_g (x A_g) with A the
  down head's weight viewed [d, r, d_g]; likewise for W_up. Per-token intermediate d_g*r instead
  of 2*d*r. Pays off only when almost every token has its own set.

``auto`` picks grouped unless distinct sets exceed a fraction of the tokens.
"""

from __future__ import annotations

import torch

from megatron_hypermoe.hypernetwork import ExpertSelectionEmbedding, HyperNetwork


def distinct_selected_sets(routing_map: torch.Tensor):
    """Unique rows of a [T, E] boolean routing map: (sets [G, E] bool, inverse [T] long)."""
    num_experts = routing_map.shape[1]
    if num_experts <= 62:
        # One int64 key per token is much faster than unique over rows.
        bits = torch.ones(num_experts, dtype=torch.int64, device=routing_map.device)
        bits = torch.bitwise_left_shift(bits, torch.arange(num_experts, device=routing_map.device))
        keys = (routing_map.to(torch.int64) * bits).sum(dim=1)
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        sets = torch.bitwise_and(unique_keys[:, None], bits[None, :]) != 0
        return sets, inverse
    sets, inverse = torch.unique(routing_map, dim=0, return_inverse=True)
    return sets, inverse


def hyper_expert_naive(x, routing_map, selection: ExpertSelectionEmbedding,
                       hypernet: HyperNetwork, layer_index: int):
    """Per-token generation and application (the paper's form). x [T, d] -> [T, d]."""
    h = hypernet.hidden(selection(routing_map), layer_index)
    w_down, b_down, w_up, b_up = hypernet.generate(h)
    a = torch.relu(torch.bmm(x.unsqueeze(1), w_down).squeeze(1) + b_down)
    return torch.bmm(a.unsqueeze(1), w_up).squeeze(1) + b_up


def hyper_expert_output(x, routing_map, selection: ExpertSelectionEmbedding,
                        hypernet: HyperNetwork, layer_index: int, impl: str = "auto",
                        factored_min_sets_fraction: float = 0.5):
    """y_hyper [T, d] for inputs x [T, d] and the boolean routing map [T, E] of selected experts.

    impl: "naive" | "grouped" | "factored" | "auto" (see the module docstring).
    """
    if impl == "naive":
        return hyper_expert_naive(x, routing_map, selection, hypernet, layer_index)
    sets, inverse = distinct_selected_sets(routing_map)
    h_sets = hypernet.hidden(selection(sets), layer_index)  # [G, d_g]
    if impl == "auto":
        many_sets = sets.shape[0] > factored_min_sets_fraction * x.shape[0]
        impl = "factored" if many_sets else "grouped"
    if impl == "grouped":
        return _apply_grouped(x, inverse, *hypernet.generate(h_sets))
    if impl == "factored":
        return _apply_factored(x, h_sets[inverse], hypernet)
    raise ValueError(f"unknown HyperExpert implementation {impl!r}")


def _apply_grouped(x, inverse, w_down, b_down, w_up, b_up):
    """Token t uses HyperExpert inverse[t]: sort tokens by set, one matmul pair per set."""
    num_sets = w_down.shape[0]
    if num_sets == 1:
        return torch.relu(x @ w_down[0] + b_down[0]) @ w_up[0] + b_up[0]
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=num_sets).tolist()
    outputs = [
        torch.relu(x_g @ w_down[g] + b_down[g]) @ w_up[g] + b_up[g]
        for g, x_g in enumerate(torch.split(x[order], counts))
    ]
    y_sorted = torch.cat(outputs)
    return torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)


def _apply_factored(x, h, hypernet: HyperNetwork):
    """Contract x with the heads' weights and per-token codes h [T, d_g], never forming a
    per-token W_down or W_up."""
    num_tokens, d = x.shape
    r = hypernet.adapter_dim
    d_g = h.shape[1]

    # x W_down(h): down_weight.weight is [d*r, d_g], row i*r+j -> entry (i, j) of W_down.
    x_a = (x @ hypernet.down_weight.weight.view(d, r * d_g)).view(num_tokens, r, d_g)
    pre = torch.bmm(x_a, h.unsqueeze(2)).squeeze(2)
    pre = pre + x @ hypernet.down_weight.bias.view(d, r) + hypernet.down_bias(h)
    a = torch.relu(pre)  # [T, r]

    # a W_up(h): up_weight.weight is [r*d, d_g], row i*d+j -> entry (i, j) of W_up.
    a_up = hypernet.up_weight.weight.view(r, d, d_g).transpose(1, 2).reshape(r * d_g, d)
    a_outer_h = (a.unsqueeze(2) * h.unsqueeze(1)).reshape(num_tokens, r * d_g)
    return a_outer_h @ a_up + a @ hypernet.up_weight.bias.view(r, d) + hypernet.up_bias(h)
