"""Core attention on torch's SDPA (model/attention.py) against megatron-core's local
DotProductAttention: the same loss and every gradient, the same generated tokens, and with
dropout the same expectation."""

import pytest
import torch

from megatron_hypermoe.errors import ConfigError
from megatron_hypermoe.model.attention import SDPAttention
from megatron_hypermoe.model.generation import generate_ids
from tests.support.hyper_expert_cases import assert_close_relative
from tests.support.tiny_model import batch, lm_loss, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def loss_and_grads(model):
    tokens, positions, labels = batch()
    loss = lm_loss(model, tokens, positions, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                           if p.grad is not None}


def assert_same_loss_and_gradients(model, reference):
    loss_reference, grads_reference = loss_and_grads(reference)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, loss_reference, rtol=1e-6, atol=0)
    assert grads.keys() == grads_reference.keys()
    for name, grad in grads_reference.items():
        assert_close_relative(grads[name], grad, rtol=1e-5, what=name)


@pytest.mark.parametrize("backend", ["auto", "flash"])
@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa"])
def test_sdpa_equals_local_attention_loss_and_every_gradient(backend, groups):
    local, _ = tiny_model("hypermoe", core_attention_backend="local", num_query_groups=groups)
    sdpa, _ = tiny_model("hypermoe", core_attention_backend=backend, num_query_groups=groups)
    sdpa.load_state_dict(local.state_dict())
    attention = sdpa.decoder.layers[0].self_attention.core_attention
    assert isinstance(attention, SDPAttention)
    assert not isinstance(local.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert_same_loss_and_gradients(sdpa, local)
    prompt = [3, 1, 4]
    assert generate_ids(sdpa, prompt, 6, 16) == generate_ids(local, prompt, 6, 16)


def test_sdpa_recomputed_core_attention_equals_local_attention():
    """Selective recomputation of core_attn (megatron re-runs the SDPA submodule in backward):
    the same loss and every gradient as megatron's attention kept for backward. (TP=2 with
    sequence parallelism, EP=2 and PP=2 with SDPA against one process with megatron's
    attention: tests/test_training.py, test_parallel_equivalence.py,
    test_pipeline_parallel.py.)"""
    local, _ = tiny_model("hypermoe", core_attention_backend="local")
    sdpa, _ = tiny_model("hypermoe", core_attention_backend="auto",
                         recompute_granularity="selective", recompute_modules=["core_attn"])
    sdpa.load_state_dict(local.state_dict())
    assert sdpa.decoder.layers[0].self_attention.checkpoint_core_attention
    assert_same_loss_and_gradients(sdpa, local)


def test_sdpa_dropout_keeps_the_expectation():
    """Dropout draws other masks than megatron's (its own kernel's RNG use), so outputs differ
    draw by draw; what must agree is the expectation: the mean over many draws of either equals
    the output without dropout, within the sampling error."""
    model, _ = tiny_model("dense", core_attention_backend="local", attention_dropout=0.5)
    local = model.decoder.layers[0].self_attention.core_attention
    sdpa_model, _ = tiny_model("dense", core_attention_backend="auto", attention_dropout=0.5)
    sdpa = sdpa_model.decoder.layers[0].self_attention.core_attention
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(6, 1, 4, 16, generator=generator) for _ in range(3))
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1).view(1, 1, 6, 6)
    with torch.no_grad():
        exact = local.eval()(query, key, value, mask)
        torch.testing.assert_close(sdpa.eval()(query, key, value, mask), exact)
        local.train(), sdpa.train()
        draws = 3000
        for module in (local, sdpa):
            outputs = torch.stack([module(query, key, value, mask) for _ in range(draws)])
            assert not torch.equal(outputs[0], outputs[1])  # dropout is on
            standard_error = outputs.std(dim=0) / draws ** 0.5
            assert ((outputs.mean(dim=0) - exact).abs() <= 5 * standard_error + 1e-6).all()


def test_fused_needs_a_gpu():
    with pytest.raises(ConfigError, match="fused kernels"):
        tiny_model("hypermoe", core_attention_backend="fused")
