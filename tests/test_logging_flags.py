"""Megatron's run-length and logging flags, in-process: --exit-duration-in-mins, what the
--log-* switches let through to the console and TensorBoard, and one-line refusals."""

import re
import time
from types import SimpleNamespace

import pytest

from megatron_hypermoe.cli.arguments import parse_run_config
from megatron_hypermoe.errors import ArgumentError
from megatron_hypermoe.training.metrics.writers import console_line, tensorboard_scalars
from tests.support.tiny_model import TINY_MODEL


def args_for(*flags):
    return parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "2", *flags])


def exit_reason(monkeypatch, minutes_since_start, *flags):
    """The reason after two iterations: the ranks' vote is read one iteration after it is cast
    (StopVote: the host does not wait for the device)."""
    from megatron_hypermoe.training import trainer

    monkeypatch.setattr(trainer, "START_TIME", time.time() - 60 * minutes_since_start)
    fake = SimpleNamespace(run=args_for(*flags), stop_requested=False,
                           stop_vote=trainer.StopVote("cpu"), state=SimpleNamespace(iteration=3))
    assert trainer.Trainer._exit_reason(fake) is None  # cast, nothing agreed yet
    return trainer.Trainer._exit_reason(fake)


def test_exit_duration_in_mins_stops_once_the_time_is_up(monkeypatch, megatron_single_process):
    assert exit_reason(monkeypatch, 4.9, "--exit-duration-in-mins", "5") is None
    assert exit_reason(monkeypatch, 5.1, "--exit-duration-in-mins", "5") == \
        "--exit-duration-in-mins 5"
    assert exit_reason(monkeypatch, 1e6) is None  # not given: no limit


VALUES = {"lm_loss": 2.0, "ms_per_iter": 10.0, "tokens_per_s": 100.0, "tflops_per_device": 0.5,
          "batch_size": 4, "val_ppl": 7.0, "val_loss": 1.9}


def test_log_switches_choose_what_console_and_tensorboard_show(tmp_path):
    plain = args_for("--tensorboard-dir", str(tmp_path))
    assert "TFLOP/s" not in console_line("x", VALUES, plain.logging)
    assert set(tensorboard_scalars(VALUES, plain.logging)) == {"lm loss", "lm loss validation"}
    everything = args_for("--tensorboard-dir", str(tmp_path), "--log-throughput",
                          "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
                          "--log-validation-ppl-to-tensorboard")
    assert "0.5000 TFLOP/s/device" in console_line("x", VALUES, everything.logging)
    assert set(tensorboard_scalars(VALUES, everything.logging)) == {
        "lm loss", "lm loss validation", "iteration-time", "tokens-per-second",
        "TFLOPs-per-device", "batch-size", "lm loss validation ppl"}
    timers_only = args_for("--tensorboard-dir", str(tmp_path), "--log-timers-to-tensorboard")
    assert "TFLOPs-per-device" not in tensorboard_scalars(VALUES, timers_only.logging)


@pytest.mark.parametrize("flags,message", [
    (["--log-timers-to-tensorboard"], "--log-timers-to-tensorboard needs --tensorboard-dir or "
                                      "--wandb-project"),
    (["--tensorboard-log-interval", "5"], "--tensorboard-log-interval needs --tensorboard-dir"),
    (["--tensorboard-dir", "tb", "--tensorboard-log-interval", "0"],
     "--tensorboard-log-interval must be at least 1"),
    (["--log-optimizer-states-to-tensorboard"],
     "--log-optimizer-states-to-tensorboard is not supported"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-exp-name NAME"),
    (["--wandb-project", "p", "--wandb-exp-name", "x"], "--wandb-project needs --wandb-save-dir"),
])
def test_logging_flags_that_cannot_act_are_refused_in_one_line(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        args_for(*flags)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("held", [False, True], ids=["first", "megatron_holds_one"])
def test_aux_loss_scale_reaches_megatron_whenever_it_changes(held, monkeypatch):
    """The trainer's aux-loss scale is one device tensor, filled when the scale changes (fp16's
    loss scale moves); megatron adopts it, or copies it into the tensor it already holds."""
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_hypermoe.training.trainer import Trainer

    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale",
                        torch.tensor(1.0) if held else None)
    fake = SimpleNamespace(aux_loss_scale=None, device=torch.device("cpu"))
    for scale in (0.5, 0.5, 0.25, 2.0):
        Trainer.set_aux_loss_scale(fake, MoEAuxLossAutoScaler, scale)
        assert MoEAuxLossAutoScaler.main_loss_backward_scale.item() == scale


def test_console_line_averages_aux_losses_over_the_events_since_the_last_line():
    """--log-interval 4 with --tensorboard-log-interval 3: the console line at iteration 4 spans
    the event at 3 (3 iterations) and the one at 4 (1 iteration): an iteration-weighted mean."""
    from megatron_hypermoe.training.metrics.windows import LogWindows

    log = LogWindows(log_interval=4, tensorboard_log_interval=3, scalar_writers=True)
    assert [log.due(i) for i in (1, 3, 4, 6, 12)] == [
        (False, False), (False, True), (True, False), (False, True), (True, True)]
    assert LogWindows(4, 3, scalar_writers=False).due(3) == (False, False)
    start = log.event_time
    for _ in range(3):
        log.count_iteration()
    assert log.take_event(start + 3.0) == (3.0, 3)
    log.add_event_aux({"aux_loss": 1.0}, 3)
    log.count_iteration()
    assert log.take_event(start + 5.0) == (2.0, 1)
    log.add_event_aux({"aux_loss": 5.0}, 1)
    elapsed, iterations, mean_aux = log.take_console(start + 5.0)
    assert (elapsed, iterations, mean_aux) == (5.0, 4, {"aux_loss": 2.0})
    assert log.take_console(start + 6.0)[1:] == (0, {})
