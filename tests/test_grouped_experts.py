"""Grouped-GEMM experts (model/grouped_experts.py, --moe-grouped-gemm) against megatron-core's
SequentialMLP: the same parameters under the same names, the same loss and every gradient, with
torch._grouped_mm and with the per-expert loop that replaces it where torch cannot run it.
(EP=2, TP=2 and PP=2: tests/test_parallel_equivalence.py, test_training.py,
test_pipeline_parallel.py.)"""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

import megatron_hypermoe.model.grouped_gemm as gg
from megatron_hypermoe.model.grouped_experts import GroupedGemmExperts
from tests.support.hyper_expert_cases import assert_close_relative
from tests.support.tiny_model import batch, lm_loss, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def loss_and_grads(model, batch_size=2, seq=16):
    tokens, positions, labels = batch(batch_size=batch_size, seq=seq)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, tokens, positions, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                           if p.grad is not None}


def experts_of(model):
    return model.decoder.layers[0].mlp.experts


def pair(moe_type="hypermoe", **overrides):
    sequential, _ = tiny_model(moe_type, moe_grouped_gemm=False, **overrides)
    grouped, _ = tiny_model(moe_type, moe_grouped_gemm=True, **overrides)
    assert type(experts_of(sequential)) is SequentialMLP
    assert isinstance(experts_of(grouped), GroupedGemmExperts)
    return sequential, grouped


CASES = {
    "swiglu": ("hypermoe", {}),
    "moe_swiglu": ("moe", {}),
    "gelu": ("hypermoe", dict(gated_linear_unit=False, activation_func=F.gelu)),
    "top1_8_experts": ("hypermoe", dict(num_moe_experts=8, moe_router_topk=1)),
    "capacity_drop": ("hypermoe", dict(moe_expert_capacity_factor=0.5)),
    "pad_to_capacity": ("hypermoe", dict(moe_expert_capacity_factor=1.0,
                                         moe_pad_expert_input_to_capacity=True)),
    "allgather": ("moe", dict(moe_token_dispatcher_type="allgather")),
    "recompute_moe": ("hypermoe", dict(recompute_granularity="selective",
                                       recompute_modules=["moe"])),
}


@pytest.mark.parametrize("native", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("case", CASES)
def test_grouped_experts_equal_sequential_mlp_loss_and_every_gradient(case, native, monkeypatch):
    """Same seed, same parameters (names and values); loss and every gradient equal within fp32
    rounding. An odd batch (3 x 15 tokens) leaves token counts that torch._grouped_mm needs
    padded."""
    if native and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    moe_type, overrides = CASES[case]
    sequential, grouped = pair(moe_type, **overrides)
    if not native:
        monkeypatch.setattr(gg, "native_grouped_mm", lambda *args: False)
    reference = sequential.state_dict()
    assert grouped.state_dict().keys() == reference.keys()
    for name, value in grouped.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, reference[name]), name
    calls = []
    monkeypatch.setattr(gg.GroupedLinear, "apply", record(gg.GroupedLinear.apply, calls))
    for batch_size, seq in ((2, 16), (3, 15)):
        loss_sequential, grads_sequential = loss_and_grads(sequential, batch_size, seq)
        loss_grouped, grads_grouped = loss_and_grads(grouped, batch_size, seq)
        torch.testing.assert_close(loss_grouped, loss_sequential, rtol=1e-6, atol=0)
        assert grads_grouped.keys() == grads_sequential.keys()
        for name, grad in grads_sequential.items():
            assert_close_relative(grads_grouped[name], grad, rtol=1e-5, what=name)
    assert calls  # the grouped path ran


def record(function, calls):
    def recorded(*args):
        calls.append(args[1].native)
        return function(*args)
    return recorded


def test_grouped_experts_use_torch_grouped_mm_on_the_cpu(monkeypatch):
    """On the CPU (every dtype) each linear layer is one torch._grouped_mm call, forward and
    backward: no per-expert loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    _, grouped = pair("moe")
    calls = []
    original = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss_and_grads(grouped, batch_size=3, seq=15)
    # 2 layers x 2 linear layers x (forward, input gradient, weight gradient)
    assert len(calls) == 2 * 2 * 3


def test_a_checkpoint_moves_between_grouped_and_sequential_experts_bit_exact():
    """The state dict of either loads into the other (strict) and gives the same parameters
    bit for bit, so checkpoints, HF export and the layout-free format see no difference; the
    loaded grouped experts are still viewed as one [experts, ...] tensor without a copy."""
    sequential, grouped = pair("hypermoe", num_moe_experts=8)
    torch.manual_seed(5)
    for source, target in ((grouped, sequential), (sequential, grouped)):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        target.load_state_dict(source.state_dict(), strict=True)
        for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
            assert torch.equal(a, b), name
    for expert_linear in ("linear_fc1", "linear_fc2"):
        weights = [getattr(e, expert_linear).weight for e in experts_of(grouped).local_experts]
        view = gg.stacked(weights)
        assert view.data_ptr() == weights[0].data_ptr()  # no copy
        assert all(torch.equal(view[i], w) for i, w in enumerate(weights))


def test_stacked_copies_weights_that_are_not_laid_out_at_equal_distances():
    base = torch.arange(40.0)
    even = [base[0:8].view(2, 4), base[12:20].view(2, 4), base[24:32].view(2, 4)]
    view = gg.stacked(even)
    assert view.data_ptr() == base.data_ptr() and view.stride() == (12, 4, 1)
    uneven = [base[0:8].view(2, 4), base[12:20].view(2, 4), base[28:36].view(2, 4)]
    overlapping = [base[0:8].view(2, 4), base[4:12].view(2, 4)]
    separate = [torch.ones(2, 4), torch.zeros(2, 4)]
    misaligned = [base[1:9].view(2, 4), base[13:21].view(2, 4)]  # starts 4 bytes in
    for weights in (uneven, overlapping, separate, misaligned):
        copy = gg.stacked(weights)
        assert copy.data_ptr() != weights[0].data_ptr()
        assert all(torch.equal(copy[i], w) for i, w in enumerate(weights))


def test_grouped_experts_refuse_linear_biases():
    from megatron_hypermoe.errors import ConfigError

    with pytest.raises(ConfigError, match="no linear biases"):
        tiny_model("moe", moe_grouped_gemm=True, add_bias_linear=True)
