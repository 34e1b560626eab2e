"""The Hugging Face HyperMoE modeling file against megatron, in-process (no checkpoints): the
name map and the shipped modeling code compute the same function."""

import math

import pytest
import torch

from megatron_hypermoe.hf.mapping import NameMapShape, to_hf
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES, gates_renormalised, routing_fields
from tests.support.tiny_model import VOCAB, hf_logits, megatron_logits, random_tokens, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.mark.parametrize("topk,renormalised", [(1, False), (2, True), (1, True), (2, False)])
def test_hf_hypermoe_matches_megatron_with_a_large_hyper_path(topk, renormalised):
    """Mapping + modeling file, with the HyperExpert made large enough to matter: top-1 and
    top-2 with their default routing (top-1: softmax over all experts, unrenormalised; top-2
    renormalised), and the other way round (top-1 gate exactly 1; top-2 unrenormalised)."""
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.hf.modeling_hypermoe import HyperMoeForCausalLM
    from megatron_hypermoe.model.initialization import initialize_from_global_names

    model, config = tiny_model("hypermoe", moe_router_topk=topk,
                               **routing_fields(topk, renormalised))
    initialize_from_global_names(model, config, seed=3)
    with torch.no_grad():  # make the HyperExpert's output comparable to the MLP's
        model.hypernetwork.fc.weight.mul_(30)
        for layer in model.hypermoe_layers():
            layer.selection.fc2.weight.mul_(30)
        for head in ("down_weight", "up_weight"):
            getattr(model.hypernetwork, head).weight.mul_(3000)
    hf_config = HyperMoeConfig(
        vocab_size=VOCAB, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=16, num_local_experts=config.num_moe_experts,
        num_experts_per_tok=topk, norm_topk_prob=gates_renormalised(config),
        **{name: getattr(config, name) for name in HYPER_SIZE_NAMES})
    hf = HyperMoeForCausalLM(hf_config).eval()
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    hf.load_state_dict(to_hf(state, NameMapShape.of(config)), strict=True)
    ids = random_tokens()
    reference = megatron_logits(model.eval(), ids)
    assert (hf_logits(hf, ids) - reference).abs().max().item() <= 1e-4
    with torch.no_grad():
        hf.model.hypernet.up_bias.bias.zero_()
        for head in ("down_weight", "up_weight", "up_bias"):
            getattr(hf.model.hypernet, head).weight.zero_()
    assert (hf_logits(hf, ids) - reference).abs().max().item() > 1e-2  # the hyper path matters


@pytest.mark.parametrize("hyper_init", ["hyperfanin", "normal"])
def test_hf_modeling_initialises_the_heads_as_megatron_does(hyper_init):
    """A HyperMoE built fresh from its HF config starts its heads the way ours do: the same
    hyperfanin bound per head (and the same scale constant), or N(0, initializer_range)."""
    from megatron_hypermoe.hf import modeling_hypermoe
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.model.hypernetwork import HYPERFANIN_SCALE, HyperNetwork, head_fan_in

    assert modeling_hypermoe.HYPERFANIN_SCALE == HYPERFANIN_SCALE
    torch.manual_seed(0)
    _, config = tiny_model("hypermoe", hyper_init=hyper_init, hidden_size=128,
                           hyper_hidden_size=64)
    ours = HyperNetwork(config)
    hf = modeling_hypermoe.HyperMoeForCausalLM(HyperMoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_local_experts=4, num_experts_per_tok=2,
        hyper_init=hyper_init, initializer_range=config.init_method_std,
        **{name: getattr(config, name) for name in HYPER_SIZE_NAMES}))
    for head in ("down_weight", "down_bias", "up_weight", "up_bias"):
        mine = getattr(ours, head).weight.detach()
        theirs = getattr(hf.model.hypernet, head).weight.detach()
        assert mine.numel() == theirs.numel()
        if hyper_init == "normal":
            for weights in (mine, theirs):
                assert abs(weights.std().item() / config.init_method_std - 1) < 0.1, head
        else:  # uniform within the same per-head bound (both fill it)
            bound = HYPERFANIN_SCALE * math.sqrt(3.0 / head_fan_in(head, config))
            for weights in (mine, theirs):
                assert 0.9 * bound < weights.abs().max().item() <= bound, head


def randomise_norms_and_biases_(model, seed=0):
    """Norm weights around 1 and biases around 0 that are not exactly 1 and 0 (as initialised),
    so that a norm or bias mapped to the wrong place shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias") or name.endswith("gate_weight"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("gated", [True, False])
def test_hf_hypermoe_with_every_option_matches_megatron(gated):
    """The HF HyperMoE class with a shared expert (gated by sigmoid(shared_expert_gate(x)) or
    not), q/k norm, qkv bias, head_dim != hidden / heads and a dense layer between the MoE
    layers (no HyperExpert there; the layer embedding still indexed by the global layer)."""
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.hf.modeling_hypermoe import HyperMoeForCausalLM
    from megatron_hypermoe.model.initialization import initialize_from_global_names

    model, config = tiny_model(
        "hypermoe", num_layers=3, moe_layer_freq=[1, 0, 1], ffn_hidden_size=96,
        moe_ffn_hidden_size=48, num_query_groups=2, kv_channels=24, qk_layernorm=True,
        add_qkv_bias=True, moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=gated,
        **routing_fields(2, True))
    initialize_from_global_names(model, config, seed=5)
    randomise_norms_and_biases_(model)
    with torch.no_grad():  # the HyperExpert, shared expert and dense MLP outputs made large
        for name, param in model.named_parameters():
            if "shared_experts.linear_fc2" in name or "layers.1.mlp.linear_fc2" in name:
                param.mul_(20)
        model.hypernetwork.fc.weight.mul_(30)
        for layer in model.hypermoe_layers():
            layer.selection.fc2.weight.mul_(30)
        for head in ("down_weight", "up_weight"):
            getattr(model.hypernetwork, head).weight.mul_(3000)
    assert [layer.layer_index for layer in model.hypermoe_layers()] == [0, 2]
    hf_config = HyperMoeConfig(
        vocab_size=VOCAB, hidden_size=config.hidden_size, intermediate_size=96,
        moe_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=16,
        num_local_experts=config.num_moe_experts, num_experts_per_tok=2, norm_topk_prob=True,
        shared_expert_intermediate_size=40, shared_expert_gate=gated, qkv_bias=True,
        qk_norm=True, mlp_only_layers=[1], **{name: getattr(config, name)
                                               for name in HYPER_SIZE_NAMES})
    hf = HyperMoeForCausalLM(hf_config).eval()
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    hf.load_state_dict(to_hf(state, NameMapShape.of(config)), strict=True)
    ids = random_tokens()
    reference = megatron_logits(model.eval(), ids)
    difference = (hf_logits(hf, ids) - reference).abs().max().item()
    assert difference <= 1e-5, difference
    with torch.no_grad():  # each optional part matters, far above that tolerance
        parts = [hf.model.layers[0].self_attn.q_norm.weight,
                 hf.model.layers[2].self_attn.k_proj.bias,
                 hf.model.layers[1].mlp.up_proj.weight,
                 hf.model.layers[2].block_sparse_moe.shared_expert.down_proj.weight,
                 hf.model.hypernet.up_bias.bias]
        if gated:
            parts.append(hf.model.layers[0].block_sparse_moe.shared_expert_gate.weight)
        for part in parts:
            saved = part.clone()
            part.mul_(0.5)
            moved = (hf_logits(hf, ids) - reference).abs().max().item()
            assert moved > 10 * 1e-5, (tuple(part.shape), moved)
            part.copy_(saved)


def test_hypermoe_config_written_before_the_optional_parts_loads_as_before():
    """A config.json without the new fields (as exports wrote it before) builds the same
    modules and weight names as then: no shared expert, norms, biases or dense layers."""
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.hf.modeling_hypermoe import HyperMoeForCausalLM

    _, config = tiny_model("hypermoe")
    old = HyperMoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_local_experts=4,
                         num_experts_per_tok=2, **{name: getattr(config, name)
                                                   for name in HYPER_SIZE_NAMES})
    names = set(HyperMoeForCausalLM(old).state_dict())
    shape = NameMapShape.of(config)
    from megatron_hypermoe.hf.mapping import hf_names

    assert names == hf_names(shape)
    assert not [n for n in names if any(part in n for part in (
        "shared_expert", "q_norm", "k_norm", ".bias", "mlp."))
        if not n.startswith("model.hypernet") and ".selection." not in n]
    assert HyperMoeForCausalLM(old).model.layers[0].block_sparse_moe.experts[0].w1.weight.shape \
        == (128, 64)
