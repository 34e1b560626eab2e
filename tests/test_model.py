"""HyperMoE inside megatron-core's GPTModel: the method's invariants at model level."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_hypermoe.model.adapter_layer import AdapterMoELayer
from megatron_hypermoe.model.config import num_hypermoe_parameters
from megatron_hypermoe.model.gpt import HyperMoEGPTModel
from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.initialization import initialize_from_global_names
from tests.support.tiny_model import SEQ, batch, lm_loss, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

HYPER_HEADS = ("down_weight", "down_bias", "up_weight", "up_bias")


def test_moe_type_switch_builds_the_right_mlp():
    for moe_type, model_cls, mlp_cls in [
        ("hypermoe", HyperMoEGPTModel, HyperMoELayer),
        ("moe", GPTModel, MoELayer),
        ("moe_adapter", GPTModel, AdapterMoELayer),
        ("dense", GPTModel, MLP),
    ]:
        model, _ = tiny_model(moe_type)
        assert type(model) is model_cls
        assert all(type(layer.mlp) is mlp_cls for layer in model.decoder.layers)
        # Default architecture: RMSNorm, RoPE, no linear biases.
        assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
        assert model.position_embedding_type == "rope"
        assert not [n for n, _ in model.named_parameters() if n.endswith("linear_fc1.bias")]


def test_hypernetwork_is_one_object_shared_by_all_layers():
    model, _ = tiny_model("hypermoe")
    layers = model.hypermoe_layers()
    assert len(layers) == 2
    assert all(layer.hypernetwork is model.hypernetwork for layer in layers)
    keys = [k for k in model.state_dict() if "hypernetwork." in k]
    assert keys and all(k.startswith("hypernetwork.") for k in keys), keys
    # Per-layer parts are distinct objects.
    assert layers[0].selection is not layers[1].selection


# The HyperExperts of all layers generated together (hyper_expert.shared_generation) -------------
@pytest.mark.parametrize("topk", [1, 2])
def test_shared_generation_equals_per_layer_and_naive_with_one_pass_over_each_head(
        topk, monkeypatch):
    import contextlib

    import megatron_hypermoe.model.gpt as gpt

    model, config = tiny_model("hypermoe", moe_router_topk=topk)  # 2 layers
    with torch.no_grad():  # a HyperExpert large enough that a wrong gradient would show
        for head in ("down_weight", "up_weight"):
            getattr(model.hypernetwork, head).weight.mul_(1000)
    head_calls = []
    model.hypernetwork.up_weight.register_forward_hook(lambda *a: head_calls.append(1))

    def step(impl):
        config.hyper_expert_impl = impl
        model.zero_grad(set_to_none=True)
        head_calls.clear()
        loss = lm_loss(model, *batch(seed=2))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
            len(head_calls)

    shared = step("allsets")
    assert shared[2] == 1  # one GEMM per head for the two layers
    naive = step("naive")
    monkeypatch.setattr(gpt, "shared_generation", lambda *a: contextlib.nullcontext())
    per_layer = step("allsets")
    assert per_layer[2] == 2
    for other in (per_layer, naive):
        torch.testing.assert_close(shared[0], other[0], rtol=1e-6, atol=0)
        for name, grad in other[1].items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (shared[1][name] - grad).abs().max() / scale <= 1e-5, name
    assert shared[1]["decoder.layers.1.mlp.selection.fc1.weight"].abs().max() > 0


# Invariant 10 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2])
def test_parameter_count_matches_formula(topk):
    hyper, config = tiny_model("hypermoe", moe_router_topk=topk)
    moe, _ = tiny_model("moe", moe_router_topk=topk)
    per_layer, shared = num_hypermoe_parameters(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(hyper) - count(moe) == config.num_layers * per_layer + shared
    assert sum(p.numel() for p in hyper.hypernetwork.parameters()) == shared


def copy_moe_into_hypermoe(moe, hyper, zero_heads):
    missing, unexpected = hyper.load_state_dict(moe.state_dict(), strict=False)
    assert not unexpected
    assert all(".selection." in k or k.startswith("hypernetwork.") for k in missing)
    if zero_heads:
        with torch.no_grad():
            for head in HYPER_HEADS:
                getattr(hyper.hypernetwork, head).weight.zero_()
                getattr(hyper.hypernetwork, head).bias.zero_()


def run_and_record(model, data):
    """Loss, every gradient, routing maps and aux losses of one forward/backward."""
    routing = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda m, i, o: routing.append(o[1].clone()))
        for layer in model.decoder.layers
    ]
    moe_utils.clear_aux_losses_tracker()
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, *data)
    loss.backward()
    for hook in hooks:
        hook.remove()
    aux = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, routing, aux


# Invariant 1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2])
def test_zeroed_hyper_heads_equal_plain_moe_bit_for_bit(topk):
    moe, _ = tiny_model("moe", moe_router_topk=topk, seed=1)
    hyper, _ = tiny_model("hypermoe", moe_router_topk=topk, seed=2)
    copy_moe_into_hypermoe(moe, hyper, zero_heads=True)
    data = batch(seed=3)
    loss_m, grads_m, routing_m, aux_m = run_and_record(moe, data)
    loss_h, grads_h, routing_h, aux_h = run_and_record(hyper, data)
    assert torch.equal(loss_m, loss_h)
    assert all(torch.equal(a, b) for a, b in zip(routing_m, routing_h))
    assert aux_m.abs().sum() > 0 and torch.equal(aux_m, aux_h)
    for name, grad in grads_m.items():
        assert torch.equal(grad, grads_h[name]), name


# Invariant 2 --------------------------------------------------------------------------------------
def test_at_init_hypermoe_output_is_within_1e3_of_moe():
    moe, _ = tiny_model("moe", moe_router_topk=2, seed=1)
    hyper, _ = tiny_model("hypermoe", moe_router_topk=2, seed=2)
    copy_moe_into_hypermoe(moe, hyper, zero_heads=False)
    tokens, position_ids, _ = batch(seed=4)
    from megatron_hypermoe.model.gpt import causal_attention_mask

    mask = causal_attention_mask(SEQ)
    with torch.no_grad():
        logits_m = moe(tokens, position_ids, mask)
        logits_h = hyper(tokens, position_ids, mask)
    relative = (logits_h - logits_m).abs().max() / logits_m.abs().max()
    assert 0 < relative < 1e-3, relative


# Invariant 6 --------------------------------------------------------------------------------------
def test_gradient_reaches_hyper_parameters_but_not_router_through_hyper_path():
    model, config = tiny_model("hypermoe", moe_router_topk=2)
    _, grads, _, _ = run_and_record(model, batch())
    hyper_names = [n for n, _ in model.named_parameters() if ".selection." in n or "hypernet" in n]
    for name in hyper_names:
        assert name in grads and grads[name].abs().sum() > 0, name

    # The hyper path alone gives the router no gradient: selection is discrete.
    layer = model.hypermoe_layers()[0]
    d = config.hidden_size
    x = torch.randn(SEQ * 2, d, requires_grad=True)
    _, routing_map = layer.router(x.view(SEQ, 2, d))
    model.zero_grad(set_to_none=True)
    layer.hyper_expert(x, routing_map).sum().backward()
    assert layer.router.weight.grad is None
    assert all(p.grad is None for p in layer.experts.parameters())
    assert layer.selection.fc1.weight.grad.abs().sum() > 0
    assert model.hypernetwork.fc.weight.grad.abs().sum() > 0


# Invariant 8 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2])
def test_each_token_runs_exactly_k_routed_experts(topk):
    model, _ = tiny_model("hypermoe", moe_router_topk=topk)
    tokens_seen = []
    for layer in model.hypermoe_layers():
        layer.experts.register_forward_hook(
            lambda m, inputs, out: tokens_seen.append(int(torch.as_tensor(inputs[1]).sum()))
        )
    _, _, routing, _ = run_and_record(model, batch())
    num_tokens = 2 * SEQ
    for routing_map in routing:
        assert torch.equal(routing_map.sum(1), torch.full((num_tokens,), topk))
    assert tokens_seen == [num_tokens * topk] * len(routing)


def make_hyper_path_large(model):
    """The 1e-3 init hides the hyper path; give it weight so that tests can see it."""
    with torch.no_grad():
        for layer in model.hypermoe_layers():
            for p in layer.selection.parameters():
                p.normal_(0, 0.3)
        for p in model.hypernetwork.parameters():
            p.normal_(0, 0.1)


# Invariant 5 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2])
def test_permuting_experts_consistently_leaves_outputs_unchanged(topk):
    model, _ = tiny_model("hypermoe", moe_router_topk=topk)
    make_hyper_path_large(model)
    data = batch(seed=7)
    with torch.no_grad():
        before = lm_loss(model, *data)
        perm = torch.tensor([2, 0, 3, 1])
        for layer in model.hypermoe_layers():
            experts = layer.experts.local_experts
            weights = [[p.clone() for p in e.parameters()] for e in experts]
            for new_index, old_index in enumerate(perm.tolist()):
                for p, w in zip(experts[new_index].parameters(), weights[old_index]):
                    p.copy_(w)
            layer.router.weight.copy_(layer.router.weight[perm])
            layer.selection.embedding.weight.copy_(layer.selection.embedding.weight[perm])
        after = lm_loss(model, *data)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_trains_20_steps_on_fixed_batch_and_loss_falls():
    model, _ = tiny_model("hypermoe", moe_router_topk=2, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = batch(seed=9)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = lm_loss(model, *data)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses


# The static-adapter ablation ----------------------------------------------------------------------
def test_static_adapter_starts_as_the_moe_and_then_learns():
    """Same seed -> the shared weights are identical and the adapter's W_up is zero, so the
    ablation computes the MoE exactly; its gradients reach the adapter; it adds exactly
    L x (2 d r + r + d) parameters."""
    moe, config = tiny_model("moe", moe_router_topk=2)
    adapter, _ = tiny_model("moe_adapter", moe_router_topk=2)
    initialize_from_global_names(moe, config, seed=5)
    initialize_from_global_names(adapter, config, seed=5)
    data = batch(seed=1)
    loss_moe, loss_adapter = lm_loss(moe, *data), lm_loss(adapter, *data)
    assert torch.equal(loss_moe, loss_adapter)
    loss_adapter.backward()
    for layer in adapter.decoder.layers:
        assert layer.mlp.adapter.up.weight.grad.abs().max() > 0
    d, r = config.hidden_size, config.hyper_adapter_dim
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(adapter) - count(moe) == config.num_layers * (2 * d * r + r + d)


# Options to reproduce the authors' runs ---------------------------------------------------------
def test_renormalised_top1_gate_is_exactly_one_and_the_router_learns_from_aux_loss_only():
    """--moe-router-renormalize: a top-1 gate of exactly 1 (Mixtral, the authors' GPT-2), so
    the LM loss gives the router no gradient; the load-balancing loss still does."""
    from megatron_hypermoe.model.config import routing_fields

    def router_grad(aux_coeff, **routing):
        model, _ = tiny_model("hypermoe", moe_router_topk=1, moe_aux_loss_coeff=aux_coeff,
                              seed=3, **routing)
        probs = []
        model.decoder.layers[0].mlp.router.register_forward_hook(
            lambda m, i, o: probs.append(o[0].detach()))
        run_and_record(model, batch(seed=2))
        return model.decoder.layers[0].mlp.router.weight.grad, probs[0], model

    default_grad, probs, model = router_grad(0.0)  # the default: the probability, not 1
    assert not model.decoder.layers[0].mlp.router.renormalize
    assert probs[probs > 0].max() < 1 and default_grad.abs().max() > 0
    grad, probs, model = router_grad(0.0, **routing_fields(1, renormalised=True))
    assert model.decoder.layers[0].mlp.router.renormalize
    assert torch.equal(probs[probs > 0], torch.ones_like(probs[probs > 0]))
    # d(p/p)/dp is 0 up to rounding
    assert grad.abs().max() < 1e-6 * default_grad.abs().max()
    grad, _, _ = router_grad(1e-2, **routing_fields(1, renormalised=True))
    assert grad.abs().max() > 1e-3 * default_grad.abs().max()


@pytest.mark.parametrize("hyper_init", ["hyperfanin", "normal"])
def test_layout_independent_init_follows_hyper_init(hyper_init):
    """Initialisation by global name draws the heads as the modules do: hyperfanin x 1e-3 (the
    HyperExpert starts near zero) or N(0, init_method_std) (the authors' actual start)."""
    model, config = tiny_model("hypermoe", hyper_init=hyper_init, hidden_size=128,
                               hyper_hidden_size=64)
    initialize_from_global_names(model, config, seed=1)
    heads = [getattr(model.hypernetwork, h).weight.detach() for h in HYPER_HEADS]
    if hyper_init == "normal":
        for weight in heads:
            assert abs(weight.std().item() / config.init_method_std - 1) < 0.1
    else:
        assert max(weight.abs().max().item() for weight in heads) < 1e-3
