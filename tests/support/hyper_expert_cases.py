"""The HyperExpert on its own: routing maps, its parts, and the fast forms against fp64."""

import torch

from tests.support.tiny_model import tiny_config

HYPER_EXPERT_CASES = {
    # name: (experts, topk, tokens, distinct patterns or None for "every token its own draw")
    "top1-few-sets": (8, 1, 64, 3),
    "top1-all-sets": (8, 1, 64, None),
    "top2-few-sets": (8, 2, 64, 5),
    "top2-many-sets": (16, 2, 48, None),
    "top4-many-sets": (16, 4, 40, None),
    "top8-many-sets": (16, 8, 40, None),
    "top8-of-8": (8, 8, 16, None),  # one possible set: s = 0
}


def random_routing_map(num_tokens, num_experts, topk, generator, num_patterns=None):
    """[T, E] boolean map with exactly topk experts per token; optionally drawn from a few
    patterns so that only num_patterns distinct sets occur."""
    scores = torch.rand(num_patterns or num_tokens, num_experts, generator=generator)
    chosen = scores.topk(topk, dim=1).indices
    patterns = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
    if num_patterns is None:
        return patterns
    pick = torch.randint(0, num_patterns, (num_tokens,), generator=generator)
    return patterns[pick]


def hyper_parts(num_experts, topk, hidden=24, seed=0, randomize_heads=True):
    from megatron_hypermoe.model.hypernetwork import ExpertSelectionEmbedding, HyperNetwork

    torch.manual_seed(seed)
    config = tiny_config(
        num_moe_experts=num_experts, moe_router_topk=topk, hidden_size=hidden,
        num_attention_heads=4, params_dtype=torch.float32,
    )
    selection = ExpertSelectionEmbedding(config)
    hypernet = HyperNetwork(config)
    if randomize_heads:
        # The 1e-3 hyperfanin init makes y_hyper ~0; compare the forms at a scale that tests them.
        with torch.no_grad():
            for p in hypernet.parameters():
                p.normal_(0, 0.3)
            for p in selection.parameters():
                p.normal_(0, 0.3)
    return config, selection, hypernet


def output_and_grads(impl, x, routing_map, selection, hypernet, layer_index=1):
    from megatron_hypermoe.model.hyper_expert import hyper_expert_output

    x = x.clone().requires_grad_(True)
    modules = [selection, hypernet]
    for module in modules:
        module.zero_grad(set_to_none=True)
    y = hyper_expert_output(x, routing_map, selection, hypernet, layer_index, impl=impl)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)  # weighs every output
    (y * weights).sum().backward()
    grads = {"x": x.grad.clone()}
    for prefix, module in zip(("selection", "hypernet"), modules):
        for name, p in module.named_parameters():
            grads[f"{prefix}.{name}"] = p.grad.clone()
    return y.detach(), grads


def assert_close_relative(actual, expected, rtol=1e-5, what=""):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol}"


def grouped_case(dtype, generator, tokens=64, hidden=32, rank=16, groups=6, device="cpu"):
    """A grouped HyperExpert's inputs with groups 1 and 4 empty (``allsets`` has many)."""
    set_index = torch.randint(0, groups, (tokens,), generator=generator)
    set_index[set_index == 1] = 0
    set_index[set_index == 4] = 5
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)
    # pre-activations near +-1, never near 0: rounding cannot flip the ReLU between dtypes
    b_down = torch.randn(groups, rank, generator=generator).sign().to(device, dtype)
    return (rand(tokens, hidden), set_index.to(device),
            rand(groups, hidden, rank) * 0.1 / hidden ** 0.5,
            b_down, rand(groups, rank, hidden) / rank ** 0.5, rand(groups, hidden))


def check_grouped_hyper_expert_against_fp64(dtype, device, rtol=1e-2):
    """The grouped form's output and every gradient in ``dtype`` against the per-token form in
    fp64 on the same values; the empty groups' weight and bias gradients exactly zero."""
    from megatron_hypermoe.model.hyper_expert import apply_hyper_experts

    inputs = grouped_case(dtype, torch.Generator().manual_seed(4), device=device)
    x, set_index, *weights = [t.requires_grad_(t.is_floating_point()) for t in inputs]
    y = apply_hyper_experts(x, set_index, *weights)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    y.backward(grad_y)

    reference = [t.detach().double().requires_grad_(t.is_floating_point()) for t in inputs]
    x64, _, w_down, b_down, w_up, b_up = reference
    a = torch.relu(torch.einsum("td,tdr->tr", x64, w_down[set_index]) + b_down[set_index])
    y64 = torch.einsum("tr,trd->td", a, w_up[set_index]) + b_up[set_index]
    y64.backward(grad_y.double())

    assert_close_relative(y.double(), y64, rtol=rtol, what="output")
    for name, ours, exact in zip(("x", "w_down", "b_down", "w_up", "b_up"),
                                 [x, *weights], [x64, *reference[2:]]):
        assert_close_relative(ours.grad.double(), exact.grad, rtol=rtol, what=f"grad {name}")
        if name != "x":
            assert ours.grad[[1, 4]].abs().max() == 0, f"grad {name}: an empty group moved"
