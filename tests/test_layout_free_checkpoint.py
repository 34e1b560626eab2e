"""Layout-free checkpoints (training/checkpoint/layout_free.py): the state by global name, which
path a load takes, and resumes in another layout that reproduce the uninterrupted run."""

import json
import shutil
import types

import pytest
import torch

from megatron_hypermoe.cli.arguments import parse_run_config
from megatron_hypermoe.errors import CheckpointError
from tests.support.processes import pretrain
from tests.support.run_outputs import read_metrics, relative
from tests.support.tiny_model import TINY_MODEL
from tests.test_ds_config import build_tiny_engine, one_step


# In one process: the state goes out and comes back whole ------------------------------------------
def _full_state(engine):
    """Every parameter's fp32 master, Adam moments (DeepSpeed's own readers) and module value."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {name: (safe_get_full_fp32_param(p).clone(),
                   safe_get_full_optimizer_state(p, "exp_avg").clone(),
                   safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
                   p.detach().float().clone())
            for name, p in engine.module.named_parameters()}


def _train(engine, steps):
    for _ in range(steps):
        one_step(engine)
        engine.step()


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("saved,resumed", [
    (["--zero-stage", "1"], ["--zero-stage", "2"]),
    (["--zero-stage", "2", "--weight-decay", "0.1"], ["--zero-stage", "1",
                                                      "--weight-decay", "0.1"]),
    # DeepSpeed's BF16_Optimizer (its own groups and lp/hp linkage); into the same wrapper, as
    # bf16 ZeRO-1 and ZeRO-2 round gradients differently
    (["--bf16", "--zero-stage", "1"], ["--bf16", "--zero-stage", "1"]),
], ids=["zero1-to-zero2", "zero2-to-zero1", "bf16-zero1"])
def test_state_round_trip_and_the_next_step_match(saved, resumed, tmp_path):
    """Masters, both moments (in every optimizer group: decay, no-decay, experts), Adam's step
    and the module's weights come back exactly into an engine of another ZeRO stage/wrapper,
    and the next step (which reads the moments and the step) gives the same weights."""
    from megatron_hypermoe.compat.deepspeed import optimizer_step_count
    from megatron_hypermoe.training.checkpoint.layout_free import (
        restore_layout_free,
        save_layout_free,
    )

    run = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1", *saved])
    engine, optimizer = build_tiny_engine(saved)
    _train(engine, 2)
    save_layout_free(engine, run.parallel, str(tmp_path))
    index = json.loads((tmp_path / "layout_free" / "index.json").read_text())
    assert index["step"] == 2 and index["engine"]["global_steps"] == 2
    before = _full_state(engine)
    assert all(m.abs().sum() > 0 for _, m, _, _ in before.values())  # every group has moments

    other, other_optimizer = build_tiny_engine(resumed)
    restore_layout_free(other, str(tmp_path), load_optimizer=True)
    assert optimizer_step_count(other_optimizer) == 2 and other.global_steps == 2
    after = _full_state(other)
    for name, tensors in before.items():
        for what, a, b in zip(("fp32", "exp_avg", "exp_avg_sq", "module"), tensors, after[name]):
            assert torch.equal(a, b), (name, what)
    _train(engine, 1)
    _train(other, 1)
    for (name, a), b in zip(engine.module.named_parameters(), other.module.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.usefixtures("megatron_single_process")
def test_deepspeed_links_later_groups_before_they_have_state():
    """The DeepSpeed 0.19.8 bug compat.deepspeed.link_optimizer_state works around: after the
    first step only the first optimizer group's parameters see their Adam state. When this
    fails, DeepSpeed has fixed it and the workaround can go."""
    from megatron_hypermoe.compat.deepspeed import link_optimizer_state

    engine, optimizer = build_tiny_engine(["--zero-stage", "1"])
    _train(engine, 1)
    groups = optimizer.bit16_groups
    assert len(groups) >= 2
    assert "exp_avg" in groups[0][0]._hp_mapping.get_optim_state_keys()
    assert groups[1][0]._hp_mapping.get_optim_state_keys() == []
    link_optimizer_state(optimizer)
    assert all("exp_avg" in p._hp_mapping.get_optim_state_keys() for g in groups for p in g)


# Which path a load takes --------------------------------------------------------------------------
def _meta(tp=1, ep=1, dp=1, zero=1, divisible_by=128, padded=512, pp=None):
    recorded = {"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                "zero_stage": zero, "make_vocab_size_divisible_by": divisible_by}
    if pp is not None:  # checkpoints from before pipeline parallelism do not record it
        recorded["pipeline_model_parallel_size"] = pp
    return {"args": recorded, "data_parallel_size": dp, "model": {"padded_vocab_size": padded}}


def _run(tp=1, ep=1, dp=1, zero=1, pp=1):
    from megatron_hypermoe.parallel.layout import ParallelLayout

    return ParallelLayout(tp=tp, ep=ep, dp=dp, zero=zero, pp=pp)


def _vocab_run(tp=1, padded=512, divisible_by=128):
    from megatron_hypermoe.training.config import EmbeddingConfig

    return types.SimpleNamespace(parallel=_run(tp=tp), embedding=EmbeddingConfig(
        padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by))


def test_load_path_is_chosen_by_layout(tmp_path, capsys):
    from megatron_hypermoe.training.checkpoint.layout_free import needs_reshard, rng_carries_over

    old, new = tmp_path / "old", tmp_path / "new"
    (new / "layout_free").mkdir(parents=True)
    (new / "layout_free" / "index.json").write_text("{}")
    old.mkdir()
    same = _meta(ep=2, dp=2, zero=2)
    assert not needs_reshard(same, _run(ep=2, dp=2, zero=2), str(old), True)
    assert "resuming with the same layout (TP 1 EP 2 DP 2 ZeRO 2)" in capsys.readouterr().out
    assert needs_reshard(same, _run(zero=2), str(new), True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "resharding from TP 1 EP 2 DP 2 ZeRO 2 to TP 1 EP 1 DP 1 ZeRO 2"
    assert out[1].startswith("RNG states are per rank and do not carry over")
    assert needs_reshard(_meta(zero=1), _run(zero=2), str(new), True)
    assert "RNG" not in capsys.readouterr().out  # same ranks, same roles: RNG carries over
    assert rng_carries_over(_meta(zero=1), _run(zero=2))
    assert not rng_carries_over(_meta(dp=1), _run(dp=2))
    # A checkpoint without layout-free files: weights only into another DP size, as before...
    assert not needs_reshard(_meta(dp=2), _run(dp=1), str(old), load_optimizer=False)
    # ... and nothing else in another layout.
    with pytest.raises(CheckpointError, match=r"predates layout-free files, so it loads only in "
                       r"the layout that wrote it \(TP 1 EP 1 DP 2 ZeRO 1; this run: TP 1 EP 1 "
                       r"DP 1 ZeRO 1\): resume it there and save again"):
        needs_reshard(_meta(dp=2), _run(dp=1), str(old), True)
    with pytest.raises(CheckpointError, match="predates layout-free files"):
        needs_reshard(_meta(tp=2), _run(tp=1), str(old), load_optimizer=False)
    with pytest.raises(CheckpointError, match="resumes under ZeRO stage 1 or 2 only"):
        needs_reshard(_meta(dp=2), _run(dp=1, zero=3), str(new), True)
    # Pipeline stages are part of the layout; a checkpoint that predates them had one.
    assert not needs_reshard(_meta(pp=2), _run(pp=2), str(old), True)
    assert not needs_reshard(_meta(), _run(pp=1), str(old), True)
    assert needs_reshard(_meta(pp=2), _run(), str(new), True)
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "resharding from TP 1 EP 1 PP 2 DP 1 ZeRO 1 to TP 1 EP 1 DP 1 ZeRO 1"
    assert not rng_carries_over(_meta(pp=2), _run())
    with pytest.raises(CheckpointError, match="predates layout-free files"):
        needs_reshard(_meta(pp=2), _run(), str(old), load_optimizer=False)


def test_vocabulary_padding_change_names_the_divisor():
    from megatron_hypermoe.training.checkpoint.layout_free import vocab_padding_message

    # vocabulary 1025: TP 2 pads to 1280, TP 1 to 1152; divisor 256 at TP 1 gives 1280
    message = vocab_padding_message(_meta(tp=2, padded=1280), _vocab_run(tp=1, padded=1152))
    assert message.endswith("pass --make-vocab-size-divisible-by 256")
    assert "checkpoint has padded_vocab_size=1280 but the flags give 1152" in message
    # TP 4 keeps TP 2's multiple 256 with 64 x 4
    assert vocab_padding_message(_meta(tp=2, padded=1280), _vocab_run(tp=4, padded=1536)) \
        .endswith("--make-vocab-size-divisible-by 64")
    assert "use a TP that divides 1280" in vocab_padding_message(
        _meta(tp=1, divisible_by=1280, padded=1280), _vocab_run(tp=3, padded=1152))


# Resume in another layout == the uninterrupted run ------------------------------------------------
EP2 = ["--expert-model-parallel-size", "2"]
RESHARD_CASES = {
    # name: (processes, layout A), (processes, layout B)
    "ep2-zero2-to-one-process": ((2, [*EP2, "--zero-stage", "2"]), (1, ["--zero-stage", "2"])),
    "one-process-to-dp2": ((1, ["--zero-stage", "1"]), (2, ["--zero-stage", "1"])),
    "tp2xep2-to-ep2": ((4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", *EP2,
                            "--zero-stage", "2"]), (2, [*EP2, "--zero-stage", "2"])),
    "zero1-to-zero2": ((2, ["--zero-stage", "1"]), (2, ["--zero-stage", "2"])),
}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(RESHARD_CASES))
def test_resume_in_another_layout_reproduces_the_uninterrupted_run(case, dataset, tmp_path):
    """Layout A trains 4 iterations uninterrupted, saving at 2; layout B resumes that checkpoint.
    Iteration 3 checks the weights, iteration 4 Adam's moments, step and the schedule (clipping
    active, so the global gradient norm over the new layout is checked too), both within 1e-5
    relative, in the same global batch (accumulation absorbs the DP change). The data continue
    at the same global sample."""
    (nproc_a, layout_a), (nproc_b, layout_b) = RESHARD_CASES[case]
    common = [*TINY_MODEL, *dataset, "--train-iters", "4", "--global-batch-size", "4",
              "--clip-grad", "0.5"]
    pretrain(*common, *layout_a, "--save", str(tmp_path / "a"), "--save-interval", "2",
             "--metrics-file", str(tmp_path / "a.jsonl"), nproc=nproc_a)
    # The iteration-2 checkpoint on its own, as it would be copied to another cluster.
    shutil.copytree(tmp_path / "a" / "iter_0000002", tmp_path / "b" / "iter_0000002")
    (tmp_path / "b" / "latest").write_text("iter_0000002")
    output = pretrain(*common, *layout_b, "--load", str(tmp_path / "b"),
                      "--metrics-file", str(tmp_path / "b.jsonl"), nproc=nproc_b)
    assert "resharding from TP" in output and "loaded" in output
    uninterrupted, _ = read_metrics(tmp_path / "a.jsonl")
    resumed, _ = read_metrics(tmp_path / "b.jsonl")
    assert [r["iteration"] for r in resumed] == [3, 4]
    worst = 0.0
    for a, b in zip(uninterrupted[2:], resumed):
        for key in ("lm_loss", "grad_norm", "lr"):
            worst = max(worst, relative(b[key], a[key]))
            assert relative(b[key], a[key]) < 1e-5, (key, a, b)
        assert a["grad_norm"] > 0.5  # clipping was active
    print(f"{case}: worst relative difference {worst:.2e}")
