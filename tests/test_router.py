"""Router and capacity options: our router is megatron-core's TopKRouter with capacity applied
after the top-k selection is recorded. It must route, drop and pad exactly as megatron's own
router and MoE layer do, while HyperMoE's side path gets the top-k selection from before
dropping."""

import re

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.moe_utils import get_capacity, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from megatron_hypermoe.model.router import TopKRouterBeforeCapacity, capacity_factor_with_minimum
from tests.support.ep_cases import ep_case_model
from tests.support.tiny_model import batch, lm_loss, tiny_config, tiny_run

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOKENS = 2 * 16  # tests/support/tiny_model.py batch(): 2 sequences of 16
DROPPING = dict(moe_expert_capacity_factor=0.5)  # 32 x 2 / 4 x 0.5 = 8 of ~16 per expert


def plain_megatron_moe_layer(config, state):
    """megatron-core's own MoELayer (its own TopKRouter, capacity inside routing()) with the
    given router and expert weights."""
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization=config.normalization).submodules.mlp
    layer = build_module(spec, config=config, layer_number=1)
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing, missing
    assert type(layer.router) is TopKRouter
    return layer


def first_layer_record(model, data):
    """(input, recorded routing map, experts' output, side output, map after capacity) of
    layer 0 in one forward."""
    layer = model.decoder.layers[0].mlp
    records, dispatched = [], []
    layer.output_recorder = lambda _, x, routing_map, out, side: records.append(
        (x.detach(), routing_map.clone(), out.detach(), side.detach()))
    hook = layer.router.register_forward_hook(lambda m, i, o: dispatched.append(o[1].clone()))
    lm_loss(model, *data)
    hook.remove()
    layer.output_recorder = None
    return (*records[0], dispatched[0])


# (factor 1 with padding: experts above capacity 16 drop, those below it are padded)
@pytest.mark.parametrize("pad,policy,factor", [(False, "probs", 0.5), (True, "probs", 1.0),
                                               (False, "position", 0.5)])
def test_hyper_expert_gets_the_top_k_selection_from_before_capacity_dropping(pad, policy,
                                                                              factor):
    data = batch(seed=3)
    free, _ = ep_case_model("hypermoe", "alltoall")
    capped, config = ep_case_model("hypermoe", "alltoall", moe_pad_expert_input_to_capacity=pad,
                                   moe_token_drop_policy=policy,
                                   moe_expert_capacity_factor=factor)
    x, free_map, free_out, free_side, _ = first_layer_record(free, data)
    x_c, topk_map, capped_out, capped_side, dispatched = first_layer_record(capped, data)
    assert torch.equal(x, x_c)  # the same model up to the first MoE layer
    # (a) the HyperExpert is the one of the no-drop top-k selection, exactly
    assert torch.equal(topk_map, free_map) and torch.equal(capped_side, free_side)
    # (b) tokens an expert dropped still get a HyperExpert contribution
    dropped = (topk_map & ~dispatched).any(dim=1)
    assert dropped.sum() >= 5, "the capacity factor should drop tokens here"
    assert capped_side.reshape(TOKENS, -1)[dropped].abs().amax(dim=1).min() > 0
    if pad:  # padding sends tokens to experts they did not select; the side path never sees it
        assert (dispatched & ~topk_map).any()
    # (c) the experts' output does drop, exactly as megatron's own MoE layer drops
    plain = plain_megatron_moe_layer(config, capped.decoder.layers[0].mlp.state_dict())
    with torch.no_grad():
        expected, _ = plain(x)
    assert torch.equal(capped_out, expected)
    assert not torch.allclose(capped_out, free_out)


@pytest.mark.parametrize("moe_type", ["hypermoe", "moe"])
def test_a_capacity_that_drops_nothing_is_no_capacity_exactly(moe_type):
    """(d) loss and every gradient bit-identical."""
    def loss_and_grads(**overrides):
        model, _ = ep_case_model(moe_type, "alltoall", **overrides)
        loss = lm_loss(model, *batch(seed=4))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    big_loss, big_grads = loss_and_grads(moe_expert_capacity_factor=4.0)
    assert torch.equal(loss, big_loss)
    assert all(torch.equal(grads[n], big_grads[n]) for n in grads)
    small_loss, _ = loss_and_grads(**DROPPING)
    assert not torch.equal(loss, small_loss)


ROUTER_CASES = {
    "capacity": dict(**DROPPING),
    "capacity-pad-position": dict(moe_pad_expert_input_to_capacity=True,
                                  moe_token_drop_policy="position", **DROPPING),
    "sigmoid-expert-bias-capacity": dict(moe_router_score_function="sigmoid",
                                         moe_router_enable_expert_bias=True, **DROPPING),
    "group-topk-scaling": dict(moe_router_num_groups=2, moe_router_group_topk=1,
                               moe_router_topk_scaling_factor=2.5,
                               moe_router_pre_softmax=True),
    "seq-aux-loss-fp64": dict(moe_router_load_balancing_type="seq_aux_loss",
                              moe_router_dtype="fp64"),
    "global-aux-loss": dict(moe_router_load_balancing_type="global_aux_loss"),
    "sinkhorn": dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
    "no-balancing": dict(moe_router_load_balancing_type="none"),
}


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_router_routes_as_megatrons_own_router(case):
    """Every option is megatron's: probabilities, map, aux-loss gradient and expert-bias token
    counts equal megatron's TopKRouter's with the same config and weight."""
    config = tiny_config(**ROUTER_CASES[case])
    torch.manual_seed(0)
    ours = TopKRouterBeforeCapacity(config, pg_collection=get_default_pg_collection())
    plain = TopKRouter(config, pg_collection=get_default_pg_collection())
    plain.load_state_dict(ours.state_dict())
    for router in (ours, plain):
        router.set_layer_number(1)
    x = torch.randn(16, 2, config.hidden_size)
    results = []
    for router in (ours, plain):
        inputs = x.clone().requires_grad_(True)
        probs, routing_map = router(inputs)
        (probs * torch.linspace(0, 1, probs.numel()).view_as(probs)).sum().backward()
        results.append((probs.detach(), routing_map, inputs.grad, router.weight.grad,
                        router.local_tokens_per_expert))
    for got, expected in zip(*results):
        assert (got is None and expected is None) or torch.equal(got, expected)


def test_min_capacity_follows_deepspeeds_rule():
    """DeepSpeed's capacity: max(ceil(T k / E x factor), min_capacity), through megatron's
    formula with an adjusted factor."""
    for tokens in range(1, 200, 7):
        for topk, experts in ((1, 8), (2, 4), (2, 64)):
            for factor in (0.1, 1.0, 1.25):
                adjusted = capacity_factor_with_minimum(factor, 4, tokens, topk, experts)
                assert get_capacity(tokens * topk, experts, adjusted) == \
                    max(get_capacity(tokens * topk, experts, factor), 4)


def test_eval_capacity_factor_and_min_capacity_apply_in_the_router():
    config = tiny_config(moe_expert_capacity_factor=0.5, moe_eval_capacity_factor=2.0,
                         moe_min_capacity=3)
    router = TopKRouterBeforeCapacity(config, pg_collection=get_default_pg_collection())
    logits_tokens = torch.randn(32, 2, config.hidden_size)
    router.train()
    _, training_map = router(logits_tokens)
    router.eval()
    _, eval_map = router(logits_tokens)
    topk_map = router.topk_map
    assert training_map.sum(dim=0).max() == 16  # ceil(64 x 2 / 4 x 0.5)
    assert torch.equal(eval_map, topk_map)  # capacity 64: nothing dropped
    few = torch.randn(2, 1, config.hidden_size)  # capacity ceil(2 x 2 / 4 x 0.5) = 1 < 3
    router.train()
    _, few_map = router(few)
    assert torch.equal(few_map, router.topk_map)


# Training-loop side: the expert-bias update and the aux-loss logging of each balancing type ---
def test_expert_bias_moves_against_the_steps_load_and_counters_reset():
    """megatron's finalize_model_grads rule, run by the trainer after each step: bias +=
    rate x sign(mean load - expert load), counted over the step's micro-batches."""
    from megatron_hypermoe.model.router import finish_router_step

    model, config = ep_case_model("hypermoe", "alltoall", moe_router_score_function="sigmoid",
                                  moe_router_enable_expert_bias=True,
                                  moe_router_bias_update_rate=0.125)
    routers = [layer.mlp.router for layer in model.decoder.layers]
    counts = torch.zeros(len(routers), config.num_moe_experts)
    for seed in (1, 2):  # two micro-batches
        lm_loss(model, *batch(seed=seed)).backward()
        counts += torch.stack([r.topk_map.sum(dim=0).float() for r in routers])
    finish_router_step(model, config)
    expected = 0.125 * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
    assert torch.equal(torch.stack([r.expert_bias for r in routers]), expected)
    assert all(not r.local_tokens_per_expert.any() for r in routers)
    with torch.no_grad():  # evaluation does not count
        lm_loss(model, *batch(seed=3))
    assert all(not r.local_tokens_per_expert.any() for r in routers)


@pytest.mark.parametrize("types,logged", [
    ("aux_loss", {"aux_loss"}), ("seq_aux_loss", {"seq_aux_loss"}),
    ("global_aux_loss", {"global_aux_loss"}), (["aux_loss", "seq_aux_loss"],
                                               {"aux_loss", "seq_aux_loss"}),
    ("sinkhorn", set()), ("none", set())])
def test_each_balancing_type_is_logged_under_its_own_name(types, logged):
    from megatron_hypermoe.model.router import finish_router_step
    from megatron_hypermoe.training.metrics.probes import AUX_LOSS_KEYS, take_aux_losses

    coeff = 0.0 if types == "sinkhorn" else [1e-2] * len(types) if isinstance(types, list) \
        else 1e-2
    model, config = ep_case_model("hypermoe", "alltoall", moe_router_load_balancing_type=types,
                                  moe_aux_loss_coeff=coeff)
    take_aux_losses(1)  # clear
    lm_loss(model, *batch(seed=1)).backward()
    finish_router_step(model, config)
    values = {AUX_LOSS_KEYS.get(k, k): v for k, v in take_aux_losses(1).items() if v != 0}
    assert set(values) == logged
    assert all(0 < v < 10 for v in values.values())
    if types == "global_aux_loss":
        assert all(layer.mlp.router.ga_steps == 0 for layer in model.decoder.layers)


# Hugging Face export ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--moe-expert-capacity-factor", "1"], "drops tokens over capacity"),
    (["--moe-train-capacity-factor", "1"], "drops tokens over capacity"),
    (["--moe-router-score-function", "sigmoid"], "routes by sigmoid scores"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "routes by sinkhorn"),
    (["--moe-router-topk-scaling-factor", "2"], "scales the gates by 2.0"),
    (["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"], "group-limited"),
    (["--moe-input-jitter-eps", "0.1"], "jitters the router input"),
])
@pytest.mark.parametrize("moe_type", ["hypermoe", "moe"])
def test_export_refuses_routing_hugging_face_cannot_compute(flags, message, moe_type):
    """Refused in one line before anything is read or written; the same model without the
    option passes the check."""
    from megatron_hypermoe.cli.arguments import parse_args
    from megatron_hypermoe.conversion.export import check_representable
    from megatron_hypermoe.errors import CheckpointError
    from megatron_hypermoe.training.checkpoint.reader import Checkpoint

    def checkpoint(extra):
        args = parse_args([*tiny_run(moe_type), "--mock-data", "--train-iters", "1",
                           "--moe-router-renormalize", *extra])
        args.padded_vocab_size = 128
        return Checkpoint(directory="unused", meta={"args": vars(args)}, state={})

    check_representable(checkpoint([]))
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        check_representable(checkpoint(flags))
    assert "\n" not in str(error.value) and "Hugging Face" in str(error.value)
