"""Every compatibility patch: the megatron-core ones (five for CPU, two everywhere) and the
DeepSpeed private-API touches, each with the version guard around it."""

import pytest
import torch

import megatron_hypermoe.compat.megatron_core as cpu_compat
from tests.support.processes import run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def test_patches_are_applied_on_this_cpu_machine():
    assert not torch.cuda.is_available()
    assert cpu_compat.cpu_patches_applied()


def test_refuses_another_megatron_core_version(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"megatron-core==0\.16\.1.*found 0\.17\.0"):
        cpu_compat.apply_cpu_patches()


def test_does_nothing_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply_cpu_patches() is False
    assert not cpu_compat.cpu_patches_applied()


# 1
def test_current_device_is_cpu_for_megatron_buffers():
    from megatron.core.utils import GlobalMemoryBuffer

    assert torch.cuda.current_device() == torch.device("cpu")
    buffer = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    assert buffer.device.type == "cpu"


# 2
def test_rng_tracker_forks_reproducible_cpu_streams_and_restores_the_default():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer_expected = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        forked_first = torch.rand(4)
    outer = torch.rand(4)
    with tracker.fork():
        forked_second = torch.rand(4)
    assert torch.equal(outer, outer_expected), "fork must not disturb the default stream"
    assert not torch.equal(forked_first, forked_second), "fork must advance its own stream"
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), forked_first), "same seed, same stream"
    torch.manual_seed(1234)


def test_activation_checkpointing_replays_dropout_identically():
    # megatron's checkpoint() saves and restores RNG state through the patched functions.
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5)
    x = torch.randn(64, requires_grad=True)

    def dropped(t):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(t, p=0.5, training=True) * t

    torch.manual_seed(3)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    direct = dropped(x)
    direct.sum().backward()
    grad_direct = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    checkpointed = tensor_parallel.checkpoint(dropped, False, x)
    checkpointed.sum().backward()
    assert torch.equal(direct, checkpointed)
    assert torch.equal(grad_direct, x.grad)
    torch.manual_seed(1234)


# 3
def test_router_gating_linear_runs_without_transformer_engine():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    inp = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(out, inp @ weight.t())
    out.sum().backward()
    assert inp.grad is not None and weight.grad is not None


def test_router_gemm_fallback_is_defined_on_gpu_machines_without_transformer_engine(monkeypatch):
    """A CUDA machine without TE hit the same NameError in the router: patch 3 is not CPU-only."""
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.delattr(moe_utils, "te_general_gemm")
    cpu_compat.apply_patches()
    assert moe_utils.te_general_gemm is None
    assert not cpu_compat.cpu_patches_applied()


# 4
def test_alltoall_dispatcher_builds_without_cuda_stream_and_runs():
    # Its EP=2 split handling (numpy splits) runs in test_parallel_equivalence.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from tests.support.tiny_model import batch, lm_loss, tiny_model

    assert isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, str)

    model, _ = tiny_model("moe", moe_router_topk=2, moe_token_dispatcher_type="alltoall")
    loss = lm_loss(model, *batch())
    loss.backward()
    dispatcher = model.decoder.layers[0].mlp.token_dispatcher
    assert type(dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    assert torch.isfinite(loss)


# 5 and 6
# 7
def test_pipeline_schedules_count_tokens_on_the_cpu_and_see_torch_otherwise():
    from megatron.core.pipeline_parallel import schedules

    counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert counter.device.type == "cpu" and counter.dtype == torch.int
    assert schedules.torch.autograd is torch.autograd  # everything else is torch itself
    assert torch.zeros is not schedules.torch.zeros  # only that module sees the patch


@pytest.mark.multiprocess
def test_sequence_parallel_norm_and_uneven_all_gather_over_two_ranks():
    output = run_torchrun(2, "tp_collectives.py")
    assert output.count("tp collectives OK") == 2


# DeepSpeed's private API (compat/deepspeed.py) ---------------------------------------------------
def test_deepspeed_glue_refuses_another_deepspeed_version(monkeypatch):
    import deepspeed

    from megatron_hypermoe.compat import deepspeed as ds_compat

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match=r"deepspeed==0\.19\.8, found 0\.20\.0"):
        ds_compat.register_expert_groups("ep_size_2", None, None)
    with pytest.raises(RuntimeError, match=r"deepspeed==0\.19\.8"):
        with ds_compat.engine_treats_as_moe(torch.nn.Linear):
            pass


def test_expert_groups_land_where_deepspeed_reads_them(monkeypatch):
    from deepspeed.utils import groups

    from megatron_hypermoe.compat.deepspeed import register_expert_groups

    monkeypatch.setattr(groups, "_EXPERT_PARALLEL_GROUP", {})
    monkeypatch.setattr(groups, "_EXPERT_DATA_PARALLEL_GROUP", {})
    register_expert_groups("ep_size_2", "ep-group", "edp-group")
    assert groups._get_expert_parallel_group("ep_size_2") == "ep-group"
    assert groups._get_expert_data_parallel_group("ep_size_2") == "edp-group"


def test_engine_treats_megatron_moe_as_moe_only_while_building():
    import deepspeed.runtime.engine as engine_module
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_hypermoe.compat.deepspeed import engine_treats_as_moe

    original = engine_module.MoE
    with engine_treats_as_moe(MoELayer):
        assert issubclass(MoELayer, engine_module.MoE) or MoELayer in engine_module.MoE
    assert engine_module.MoE is original


def test_deepspeed_files_load_weights_only(tmp_path):
    """A record DeepSpeed writes loads; a pickle that would run code is a one-line refusal."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megatron_hypermoe.compat.deepspeed import load_deepspeed_file
    from megatron_hypermoe.errors import CheckpointError

    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "scaler": DynamicLossScaler(
        init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
        consecutive_hysteresis=False)}, good)
    assert torch.equal(load_deepspeed_file(str(good))["module"]["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"module": _Exploit(str(tmp_path / "pwned"))}, bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_deepspeed_file(str(bad))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="is missing"):
        load_deepspeed_file(str(tmp_path / "absent.pt"))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
