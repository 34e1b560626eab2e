"""The HyperExpert output y_hyper for a batch of tokens, in four exact forms.

All of them compute, for each token t with input x_t and selected-expert set S(t):

    h_t   = HyperNetwork.hidden(selection(S(t)), layer)
    y_t   = relu(x_t W_down(h_t) + b_down(h_t)) W_up(h_t) + b_up(h_t)

- ``naive``: the paper's code. Generates W_down, W_up for every token (2*d*r values per token,
  kept for backward). The reference the fast forms are tested against; never used for speed.
- ``allsets``: h depends on the token only through S(t), and a top-k router can select only
  C(E, k) sets. Generate a HyperExpert for every possible set (static shapes), find each token's
  set by its rank in the combinatorial number system (tensor arithmetic), and apply them as one
  grouped GEMM pair. No Python loop over sets, no host synchronisation: what a GPU wants.
- ``grouped``: generate one HyperExpert per distinct set present in the batch (``torch.unique``:
  the host waits for the device) and apply them the same way. Fewer sets to generate than
  ``allsets`` when C(E, k) exceeds the token count.
- ``factored``: never materialise a HyperExpert: x W_down(h) = sum_g h_g (x A_g) with A the down
  head's weight viewed [d, d_g, r]; likewise for W_up. Per-token codes, no synchronisation; its
  cost grows with the tokens, not the sets, so it is the form for huge C(E, k) (top-8 of 64).

``auto`` (:func:`choose_impl`): generating a HyperExpert costs d_g * 2dr multiply-adds and keeps
2dr values for backward, so ``allsets`` costs C(E, k) of each per layer; ``factored`` costs about
one generation per token (the contraction is the same product per token) and keeps 2 * d_g * r
values per token; ``grouped`` one generation per distinct set present (<= both). Rule:
``allsets`` when it keeps no more than ``factored`` would (C * d <= T * d_g: top-1/top-2 of 8 at
any usual batch, not top-2 of 64 at hidden 2048); otherwise ``grouped`` on the CPU (a host sync
costs nothing there) unless the distinct sets exceed ``factored_min_sets_fraction`` of the
tokens, and ``factored`` on a GPU. Measured (``benchmarks/bench_layer.py``, numbers in
benchmarks/README.md):
on the CPU ``allsets`` and ``grouped`` cost the same at GPT-2 width (top-1/top-2 of 8, 2,048
tokens, every set present); on one H200 (2026-11-26, before ``allsets`` existed) the
synchronising ``grouped`` form cost 1.58-2.07x the MoE layer and ``factored`` 1.12-1.64x.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import torch

from megatron_hypermoe.model import grouped_gemm
from megatron_hypermoe.model.grouped_gemm import (
    GroupBounds,
    group_ends,
    grouped_mm,
    grouped_row_sum,
    grouped_weight_grad,
)
from megatron_hypermoe.model.hypernetwork import ExpertSelectionEmbedding, HyperNetwork
from megatron_hypermoe.model.recompute import in_recompute_replay


# Selected sets -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _colex_tables(num_experts: int, topk: int, device: str = "cpu"):
    """(every k-subset of E experts as a [C, E] bool map in colex order, and C(n, j) for n < E,
    j <= k as an [E, k + 1] table), built once per device: no copy per call."""
    if device != "cpu":
        return tuple(table.to(device) for table in _colex_tables(num_experts, topk))
    binomial = torch.tensor([[math.comb(n, j) for j in range(topk + 1)]
                             for n in range(num_experts)], dtype=torch.int64)
    sets = torch.zeros(math.comb(num_experts, topk), num_experts, dtype=torch.bool)
    for chosen in itertools.combinations(range(num_experts), topk):
        rank = sum(math.comb(e, j + 1) for j, e in enumerate(chosen))
        sets[rank, list(chosen)] = True
    return sets, binomial


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def all_selected_sets(num_experts: int, topk: int, device) -> torch.Tensor:
    """Every set a top-k router can select, [C(E, k), E] bool, row i the set of colex rank i."""
    return _colex_tables(num_experts, topk, _device_key(device))[0]


def selected_set_index(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """Row i of :func:`all_selected_sets` that each token selected, [T] long, for a [T, E] map
    with exactly ``topk`` experts per row (a top-k router's map). The colex rank of the
    selected experts e_1 < ... < e_k is sum_j C(e_j, j): position j is a cumulative count."""
    binomial = _colex_tables(routing_map.shape[1], topk, _device_key(routing_map.device))[1]
    selected = routing_map.to(torch.int64)
    position = torch.cumsum(selected, dim=1).clamp_(max=topk)  # j for a selected expert
    experts = torch.arange(routing_map.shape[1], device=routing_map.device)
    return (binomial[experts, position] * selected).sum(dim=1)


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


# Choosing and computing --------------------------------------------------------------------------
def choose_impl(impl: str, num_tokens: int, num_experts: int, topk: int, device,
                hidden_size: int, code_size: int) -> str:
    """Resolve ``auto`` from shapes alone (no look at the data, so no host synchronisation).
    ``grouped`` returned here on the CPU may still turn ``factored`` once the distinct sets
    are known (see :func:`hyper_expert_output`)."""
    if impl != "auto":
        return impl
    if allsets_fits(num_tokens, num_experts, topk, hidden_size, code_size):
        return "allsets"
    return "grouped" if torch.device(device).type == "cpu" else "factored"


def allsets_fits(num_tokens: int, num_experts: int, topk: int, hidden_size: int,
                 code_size: int) -> bool:
    """Whether generating all C(E, k) HyperExperts keeps no more for backward than the factored
    form (C * 2dr values against 2 * T * d_g * r: C * d <= T * d_g). Its generation is then
    cheaper too (C <= T, as d_g < d)."""
    return math.comb(num_experts, topk) * hidden_size <= num_tokens * code_size


def hyper_expert_naive(x, routing_map, selection: ExpertSelectionEmbedding,
                       hypernet: HyperNetwork, layer_index: int):
    """Per-token generation and application (the paper's form). x [T, d] -> [T, d]."""
    h = hypernet.hidden(selection(routing_map), layer_index)
    w_down, b_down, w_up, b_up = hypernet.generate(h)
    a = torch.relu(torch.bmm(x.unsqueeze(1), w_down).squeeze(1) + b_down)
    return torch.bmm(a.unsqueeze(1), w_up).squeeze(1) + b_up


def hyper_expert_output(x, routing_map, selection: ExpertSelectionEmbedding,
                        hypernet: HyperNetwork, layer_index: int, impl: str = "auto",
                        factored_min_sets_fraction: float = 0.5, topk: int = None):
    """y_hyper [T, d] for inputs x [T, d] and the boolean routing map [T, E] of selected experts
    (exactly ``topk`` per row; inferred from the first row if not given).

    impl: "naive" | "allsets" | "grouped" | "factored" | "auto" (see the module docstring).
    """
    num_tokens, num_experts = routing_map.shape
    if topk is None:
        topk = int(routing_map[:1].sum()) if num_tokens else 1  # (reads the device)
    chosen_by_auto = impl == "auto"
    impl = choose_impl(impl, num_tokens, num_experts, topk, x.device, x.shape[1],
                       hypernet.fc.out_features)
    if impl == "naive":
        return hyper_expert_naive(x, routing_map, selection, hypernet, layer_index)
    if impl == "factored":
        return _apply_factored(x, hypernet.hidden(selection(routing_map), layer_index), hypernet)
    if impl == "allsets":
        weights = _allsets_weights(selection, hypernet, layer_index, num_experts, topk, x.device)
        return apply_hyper_experts(x, selected_set_index(routing_map, topk), *weights)
    if impl != "grouped":
        raise ValueError(f"unknown HyperExpert implementation {impl!r}")
    sets, set_index = distinct_selected_sets(routing_map)
    if chosen_by_auto and sets.shape[0] > factored_min_sets_fraction * num_tokens:
        return _apply_factored(x, hypernet.hidden(selection(routing_map), layer_index), hypernet)
    h_sets = hypernet.hidden(selection(sets), layer_index)  # [G, d_g]
    return apply_hyper_experts(x, set_index, *hypernet.generate(h_sets))


def apply_hyper_experts(x, set_index, w_down, b_down, w_up, b_up):
    """Token t uses HyperExpert set_index[t] of the G generated ones."""
    if w_down.shape[0] == 1:
        return torch.relu(x @ w_down[0] + b_down[0]) @ w_up[0] + b_up[0]
    return GroupedHyperExpert.apply(x, set_index, w_down, b_down, w_up, b_up)


# Every possible HyperExpert, generated once per model forward ------------------------------------
class _SharedGeneration:
    def __init__(self, layers, grad_enabled: bool):
        self.selections = dict((index, selection) for selection, index in layers)
        self.grad_enabled = grad_enabled
        self.weights = None  # {layer index: (w_down, b_down, w_up, b_up)}, on first use


@contextlib.contextmanager
def shared_generation(hypernet: HyperNetwork, layers):
    """For one model forward over ``layers`` [(ExpertSelectionEmbedding, layer index)]: the first
    layer that takes the ``allsets`` form generates every possible HyperExpert of every listed
    layer with one GEMM per head, and the others take theirs. Backward then also makes one GEMM
    per head for the heads' weight gradients (autograd joins the layers' gradients of the one
    output first) instead of one per layer: each pass over a head's d_g x d*r weight is made
    once per model instead of once per layer."""
    previous = hypernet.__dict__.get("_shared_generation")
    hypernet.__dict__["_shared_generation"] = _SharedGeneration(layers, torch.is_grad_enabled())
    try:
        yield
    finally:
        hypernet.__dict__["_shared_generation"] = previous


def _allsets_weights(selection, hypernet, layer_index, num_experts, topk, device):
    """This layer's HyperExperts for every possible set: from the model's shared generation when
    there is one, else generated here. A forward replayed by activation recomputation generates
    its own: its backward runs on its own, before the shared one."""
    shared = hypernet.__dict__.get("_shared_generation")
    sets = all_selected_sets(num_experts, topk, device)
    if shared is None or layer_index not in shared.selections or in_recompute_replay():
        return hypernet.generate(hypernet.hidden(selection(sets), layer_index))
    if shared.weights is None:
        with torch.set_grad_enabled(shared.grad_enabled):
            z = torch.cat([sel(sets) for sel in shared.selections.values()])
            layers = torch.cat([torch.full((sets.shape[0],), index, device=device)
                                for index in shared.selections])
            generated = hypernet.generate(hypernet.hidden(z, layers))
            # (split here too: views made with grad disabled would not carry the gradient)
            per_layer = zip(*(tensor.split(sets.shape[0]) for tensor in generated))
            shared.weights = dict(zip(shared.selections, per_layer))
    return shared.weights[layer_index]


# Grouped HyperExperts -----------------------------------------------------------------------------
class GroupedHyperExpert(torch.autograd.Function):
    """y[t] = relu(x[t] W_down[g] + b_down[g]) W_up[g] + b_up[g] with g = set_index[t].

    Tokens are sorted by set and each of the two products is one grouped GEMM. Written out by
    hand so that backward keeps only x (which the MoE path saves anyway), the bottleneck
    activations [T, r] and the generated weights: autograd would also keep the set-sorted copy
    of x, about as large as x itself.
    """

    @staticmethod
    def forward(ctx, x, set_index, w_down, b_down, w_up, b_up):
        # (index_select, not x[order] or index_copy_: 4-6x faster on the CPU for [T, d] rows)
        order = torch.argsort(set_index, stable=True)
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(
            order.shape[0], device=order.device))
        sorted_index = set_index.index_select(0, order)
        ends = group_ends(sorted_index, w_down.shape[0])
        # rows of length d and r, and (the weight gradients' a^T) T
        groups = GroupBounds(ends, grouped_gemm.native_grouped_mm(x, *x.shape, w_down.shape[2]))
        a = torch.relu(grouped_mm(x.index_select(0, order), w_down, groups)
                       .add_(b_down.index_select(0, sorted_index)))
        y_sorted = grouped_mm(a, w_up, groups).add_(b_up.index_select(0, sorted_index))
        ctx.save_for_backward(x, order, unsort, sorted_index, a, w_down, w_up)
        ctx.groups = groups  # (its ends are an intermediate: no reference cycle)
        return y_sorted.index_select(0, unsort)

    @staticmethod
    def backward(ctx, grad_y):
        x, order, unsort, sorted_index, a, w_down, w_up = ctx.saved_tensors
        groups = ctx.groups
        num_sets = w_down.shape[0]
        grad_y_sorted = grad_y.index_select(0, order)
        grad_w_up = grouped_weight_grad(a, grad_y_sorted, groups)
        grad_b_up = grouped_row_sum(grad_y_sorted, sorted_index, num_sets)
        grad_pre = grouped_mm(grad_y_sorted, w_up.transpose(1, 2), groups).mul_(a > 0)
        grad_w_down = grouped_weight_grad(x.index_select(0, order), grad_pre, groups)
        grad_b_down = grouped_row_sum(grad_pre, sorted_index, num_sets)
        grad_x = grouped_mm(grad_pre, w_down.transpose(1, 2), groups).index_select(0, unsort)
        return grad_x, None, grad_w_down, grad_b_down, grad_w_up, grad_b_up


# Factored ----------------------------------------------------------------------------------------
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
