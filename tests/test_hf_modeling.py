"""The Hugging Face HyperMoE modeling file against megatron, in-process (no checkpoints): the
name map and the shipped modeling code compute the same function."""

import pytest
import torch

from megatron_hypermoe.hf.mapping import NameMapShape, to_hf
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES
from tests.helpers import VOCAB, hf_logits, megatron_logits, random_tokens, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.mark.parametrize("topk", [1, 2])
def test_hf_hypermoe_matches_megatron_with_a_large_hyper_path(topk):
    """Mapping + modeling file, with the HyperExpert made large enough to matter, top-1
    (megatron's unrenormalised probability) and top-2."""
    from megatron_hypermoe.hf.configuration_hypermoe import HyperMoeConfig
    from megatron_hypermoe.hf.modeling_hypermoe import HyperMoeForCausalLM
    from megatron_hypermoe.model.initialization import initialize_from_global_names

    model, config = tiny_model("hypermoe", moe_router_topk=topk)
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
        num_experts_per_tok=topk, norm_topk_prob=topk > 1,
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
