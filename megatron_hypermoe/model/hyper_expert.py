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

from megatron_hypermoe.model.hypernetwork import ExpertSelectionEmbedding, HyperNetwork


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
    """Token t uses HyperExpert inverse[t]: one matmul pair per distinct set."""
    if w_down.shape[0] == 1:
        return torch.relu(x @ w_down[0] + b_down[0]) @ w_up[0] + b_up[0]
    return GroupedHyperExpert.apply(x, inverse, w_down, b_down, w_up, b_up)


class GroupedHyperExpert(torch.autograd.Function):
    """y[t] = relu(x[t] W_down[g] + b_down[g]) W_up[g] + b_up[g] with g = inverse[t].

    Written out by hand so that backward keeps only x (which the MoE path saves anyway), the
    bottleneck activations [T, r] and the generated weights: autograd would also keep the
    set-sorted copy of x, about as large as x itself.
    """

    @staticmethod
    def forward(ctx, x, inverse, w_down, b_down, w_up, b_up):
        order, counts = _sort_by_set(inverse, w_down.shape[0])
        a_chunks, y_chunks = [], []
        for g, x_g in enumerate(torch.split(x[order], counts)):
            a_g = torch.relu(torch.addmm(b_down[g], x_g, w_down[g]))
            a_chunks.append(a_g)
            y_chunks.append(torch.addmm(b_up[g], a_g, w_up[g]))
        y = torch.empty_like(x).index_copy_(0, order, torch.cat(y_chunks))
        ctx.counts = counts
        ctx.save_for_backward(x, order, torch.cat(a_chunks), w_down, w_up)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, order, a_sorted, w_down, w_up = ctx.saved_tensors
        counts = ctx.counts
        grad_w_down, grad_w_up = torch.zeros_like(w_down), torch.zeros_like(w_up)
        grad_b_down = w_down.new_zeros(w_down.shape[0], w_down.shape[2])
        grad_b_up = w_up.new_zeros(w_up.shape[0], w_up.shape[2])
        grad_x_chunks = []
        chunks = zip(torch.split(x[order], counts), torch.split(grad_y[order], counts),
                     torch.split(a_sorted, counts))
        for g, (x_g, grad_y_g, a_g) in enumerate(chunks):
            grad_w_up[g] = a_g.t() @ grad_y_g
            grad_b_up[g] = grad_y_g.sum(0)
            grad_pre = (grad_y_g @ w_up[g].t()) * (a_g > 0)
            grad_w_down[g] = x_g.t() @ grad_pre
            grad_b_down[g] = grad_pre.sum(0)
            grad_x_chunks.append(grad_pre @ w_down[g].t())
        grad_x = torch.empty_like(x).index_copy_(0, order, torch.cat(grad_x_chunks))
        return grad_x, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up


def _sort_by_set(inverse, num_sets):
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=num_sets).tolist()
    return order, counts


def _apply_factored(x, h, hypernet: HyperNetwork):
    """Contract x with the heads' weights and per-token codes h [T, d_g], never forming a
    per-token W_down or W_up."""
    num_tokens, d = x.shape
    r = hypernet.adapter_dim
    d_g = h.shape[1]

    # x W_down(h) = sum_g h_g (x A_g): down_weight.weight is [d_g, d*r], output i*r+j -> (i, j).
    a_down = hypernet.down_weight.weight.view(d_g, d, r).transpose(0, 1).reshape(d, d_g * r)
    x_a = (x @ a_down).view(num_tokens, d_g, r)
    pre = torch.bmm(h.unsqueeze(1), x_a).squeeze(1)
    pre = pre + x @ hypernet.down_weight.bias.view(d, r) + hypernet.down_bias(h)
    a = torch.relu(pre)  # [T, r]

    # a W_up(h) = sum_g h_g (a B_g): up_weight.weight is [d_g, r*d], viewed [(g, i), j].
    h_outer_a = (h.unsqueeze(2) * a.unsqueeze(1)).reshape(num_tokens, d_g * r)
    y = h_outer_a @ hypernet.up_weight.weight.view(d_g * r, d)
    return y + a @ hypernet.up_weight.bias.view(r, d) + hypernet.up_bias(h)
