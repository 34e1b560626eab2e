"""What changes on a GPU, checked on the CPU: the model on a device that is not the host's
(tests/emulated_accelerator.py), every op and collective checking devices as CUDA and NCCL do.
Each test here failed on the code the first GPU reading found wrong (issue 26)."""

import pytest
import torch

from megatron_hypermoe.model.generation import generate_ids
from tests.emulated_accelerator import DEVICE, devices_of, emulated_accelerator
from tests.support.tiny_model import batch, lm_loss, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.fixture
def accelerator(monkeypatch):
    with emulated_accelerator(monkeypatch) as device:
        yield device


def accelerator_model(moe_type="hypermoe", **overrides):
    """The tiny model as a GPU machine builds it: megatron-core's layers where
    torch.cuda.current_device() says, not from CPU initialisation."""
    model, config = tiny_model(moe_type, use_cpu_initialization=False, **overrides)
    return model, config


def test_the_emulation_fails_where_a_gpu_fails(accelerator):
    """The harness itself: mixed devices, a CPU generator on device logits and a host tensor in
    a collective each raise; host scalars and copies across do not."""
    import torch.distributed as dist

    on_device = torch.ones(4, device=accelerator)
    assert on_device.device == DEVICE and (on_device * torch.tensor(2.0)).sum().item() == 8.0
    with pytest.raises(RuntimeError, match="same device"):
        on_device + torch.ones(4)
    with pytest.raises(RuntimeError, match="generator"):
        torch.multinomial(on_device, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(2))
    dist.all_reduce(on_device)
    assert on_device.cpu().tolist() == [1.0] * 4


def test_a_built_model_lives_on_one_device(accelerator):
    """megatron-core builds its layers on the GPU; torch's RMSNorm, the hypernetwork and the
    selection embeddings followed the default device (the CPU) before."""
    model, _ = accelerator_model("hypermoe", normalization="RMSNorm")
    assert devices_of(model) == {DEVICE}
    tokens, positions, labels = (t.to(accelerator) for t in batch())
    loss = lm_loss(model, tokens, positions, labels)
    loss.backward()
    assert model.hypernetwork.fc.weight.grad.device == DEVICE


@pytest.mark.parametrize("greedy", [True, False])
def test_sampling_from_device_logits_equals_the_host(greedy, monkeypatch):
    """A CPU generator drew from CUDA logits (torch.multinomial raised); the choice is now made
    on the host, so one seed gives the same tokens on either device."""
    def sample(m):
        return generate_ids(m, [3, 1, 4], 6, 16, greedy=greedy, top_p=0.9,
                            generator=torch.Generator().manual_seed(5))

    reference, _ = tiny_model("hypermoe")
    expected = sample(reference)
    with emulated_accelerator(monkeypatch):
        model, _ = accelerator_model("hypermoe")
        model.load_state_dict(reference.state_dict())
        assert sample(model) == expected


def test_collectives_of_setup_and_logging_take_device_tensors(accelerator, monkeypatch):
    """Under pipeline parallelism the parameter count and the logged per-layer values are summed
    over the stages: the parameter count all-reduced a host tensor (NCCL refuses it)."""
    import megatron_hypermoe.parallel.pipeline as pipeline
    from megatron_hypermoe.cli.arguments import run_config_for_model
    from megatron_hypermoe.training.flops import parameter_counts
    from megatron_hypermoe.training.metrics.probes import (
        ExpertLoadCounter,
        side_path_values,
        take_aux_losses,
    )

    model, config = accelerator_model("hypermoe")
    load = ExpertLoadCounter(model)
    tokens, positions, labels = (t.to(accelerator) for t in batch())
    lm_loss(model, tokens, positions, labels).backward()
    monkeypatch.setattr(pipeline, "pipeline_size", lambda: 2)  # the stage sums run
    run = run_config_for_model(config, world_size=1, train_iters=1, mock_data=True)
    total, active = parameter_counts(model, run)
    assert total == sum(p.numel() for p in model.parameters()) and 0 < active < total
    assert len(side_path_values(model)["hyper_output_rms"]) == 2
    assert load.take().sum().item() == tokens.numel() * 2 * 2  # top-2, 2 layers
    take_aux_losses(1)


def test_expert_analysis_of_a_model_on_the_device(accelerator):
    """tools/analyze_experts.py on a GPU node: the load counts were kept on the host."""
    from megatron_hypermoe.inference.analysis import ExpertAnalyzer
    from megatron_hypermoe.inference.evaluation import megatron_token_nll

    model, _ = accelerator_model("hypermoe")
    analyzer = ExpertAnalyzer(model)
    tokens, _, labels = batch()
    with torch.no_grad():
        megatron_token_nll(model)(tokens[:1], labels[:1])
    summary = analyzer.summary()
    assert len(summary) == 2 and abs(sum(summary[0]["load_fraction"]) - 1.0) < 1e-9
    assert 0.0 < summary[0]["side_over_experts_rms"]


def test_stop_vote_is_agreed_on_the_device_and_read_one_iteration_later(accelerator):
    """The trainer's stop flags (SIGTERM, --exit-duration-in-mins): all-reduced as device
    tensors, read on the host one iteration after they were cast."""
    from megatron_hypermoe.training.trainer import StopVote

    vote = StopVote(accelerator)
    assert vote.cast(False, False) is None
    assert vote.cast(True, False) == [False, False]
    assert vote.cast(False, True) == [True, False]
    assert vote.read() == [False, True]
