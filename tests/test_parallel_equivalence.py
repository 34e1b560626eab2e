"""Invariant 9: an expert-parallel run computes what a single-rank run computes. The EP=2 runs
take the default SDPA attention and grouped-GEMM experts, the one-process reference megatron's
DotProductAttention and SequentialMLP (tests/support/ep_cases.py: EP_REFERENCE_OVERRIDES)."""

import pytest
import torch

from tests.support.ep_cases import (
    EP_CAPACITY_CASES,
    EP_CASES,
    EP_IMPL_CASES,
    EP_RECOMPUTE_CASES,
    EP_REFERENCE_OVERRIDES,
    ep_case_model,
    loss_and_global_grads,
)
from tests.support.processes import run_torchrun


def assert_relative(actual, expected, tol, what):
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="module")
def ep2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    run_torchrun(2, "ep_equivalence.py", "--out", str(out))
    return out


CASES = {**{f"{moe_type}_{dispatcher}": (moe_type, dispatcher, {})
            for moe_type, dispatcher in EP_CASES}, **EP_CAPACITY_CASES,
         **EP_RECOMPUTE_CASES, **EP_IMPL_CASES}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_ep2_equals_ep1_loss_and_gradients(case, ep2_results, megatron_single_process):
    moe_type, dispatcher, overrides = CASES[case]
    model, config = ep_case_model(moe_type, dispatcher, **{**overrides, **EP_REFERENCE_OVERRIDES})
    reference = [loss_and_global_grads(model, config, data_seed=100 + r) for r in range(2)]
    for rank in range(2):
        got = torch.load(ep2_results / f"{case}_rank{rank}.pt", weights_only=True)
        ref_loss, ref_grads = reference[rank]
        assert_relative(got["loss"], ref_loss, 1e-6, f"rank {rank} loss")
        own_experts = {f".local_experts.{rank * 2 + i}." for i in range(2)}
        expected_names = {
            n for n in ref_grads
            if ".local_experts." not in n or any(e in n for e in own_experts)
        }
        assert set(got["grads"]) == expected_names
        for name, grad in got["grads"].items():
            if ".local_experts." in name:
                # An expert's gradient sums the tokens that both ranks routed to it.
                expected = reference[0][1][name] + reference[1][1][name]
            else:
                expected = ref_grads[name]
            assert expected.abs().max() > 0, name
            assert_relative(grad, expected, 1e-6, f"rank {rank} grad {name}")
