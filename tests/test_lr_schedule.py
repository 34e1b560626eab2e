"""The learning-rate and weight-decay schedule (training/lr_schedule.py), in-process: at every
iteration the trainer's groups hold what megatron-core's OptimizerParamScheduler computes and
what the formula says; group multipliers; resume semantics; flag validation."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_hypermoe.cli.arguments import parse_run_config
from megatron_hypermoe.errors import ArgumentError, CheckpointError
from megatron_hypermoe.training.lr_schedule import LRSchedule, scheduler_steps
from tests.support.tiny_model import TINY_MODEL

BATCH = 4  # global batch of the runs below (micro-batch 2 x 2 accumulation steps)
HYPER_MULT = 0.25


def args_for(*flags):
    return parse_run_config([*TINY_MODEL, "--mock-data", "--global-batch-size", str(BATCH),
                             *flags])


def optimizer_like_the_trainers(weight_decay):
    """Groups as training/setup.py builds them: decay, no_decay (wd_mult 0), a multiplied one."""
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    return torch.optim.AdamW([
        {"name": "decay", "params": [params[0]], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [params[1]], "weight_decay": 0.0, "wd_mult": 0.0},
        {"name": "hyper_generating", "params": [params[2]], "weight_decay": weight_decay,
         "lr_mult": HYPER_MULT}], lr=1.0)


def megatron_reference(args, num_steps, **group):
    """megatron-core's scheduler alone (one group, with ``group``'s overrides) at ``num_steps``
    samples."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    stand_in = SimpleNamespace(param_groups=[group])
    scheduler = OptimizerParamScheduler(
        stand_in, init_lr=args.schedule.lr_warmup_init, max_lr=args.optimizer.lr,
        min_lr=args.schedule.min_lr,
        lr_decay_style=args.schedule.lr_decay_style, start_wd=args.schedule.start_weight_decay,
        end_wd=args.schedule.end_weight_decay, wd_incr_style=args.schedule.weight_decay_incr_style,
        lr_wsd_decay_style=args.schedule.lr_wsd_decay_style, **scheduler_steps(args))
    scheduler.step(num_steps)
    return stand_in.param_groups[0]


def run_schedule(args):
    """The lr and weight decay of each group at each iteration, as the trainer steps it."""
    optimizer = optimizer_like_the_trainers(args.optimizer.weight_decay)
    schedule = LRSchedule(optimizer, args)
    seen = []
    for iteration in range(args.training.train_iters + 1):
        seen.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])
        assert schedule.lr == optimizer.param_groups[0]["lr"]  # the canonical (logged) lr
        schedule.step(args.training.global_batch_size)
    return seen


def cosine(i, lr, min_lr, warmup, decay, init=0.0):
    if i <= warmup:
        return init + (lr - init) * i / warmup
    if i > decay:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (decay - warmup)))


def wsd(i, lr, min_lr, warmup, decay, anneal):
    if i <= warmup:
        return lr * i / warmup
    if i <= decay - anneal:
        return lr
    return min_lr + (lr - min_lr) * (2 * 0.5 ** ((i - (decay - anneal)) / anneal) - 1)


def inverse_sqrt(i, lr, min_lr, warmup):
    return lr * i / warmup if i <= warmup else max(min_lr, lr * math.sqrt(warmup / i))


@pytest.mark.parametrize("flags,formula", [
    (["--lr-decay-style", "cosine", "--lr-warmup-iters", "3", "--lr-decay-iters", "16",
      "--lr-warmup-init", "1e-4"],
     lambda i: cosine(i, 1e-3, 2e-5, 3, 16, init=1e-4)),
    (["--lr-decay-style", "WSD", "--lr-warmup-iters", "2", "--lr-wsd-decay-iters", "6"],
     lambda i: wsd(i, 1e-3, 2e-5, 2, 20, 6)),
    (["--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", "4"],
     lambda i: inverse_sqrt(i, 1e-3, 2e-5, 4)),
    (["--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.25", "--lr-decay-iters", "12"],
     lambda i: cosine(i, 1e-3, 2e-5, 3, 12)),
], ids=["cosine-warmup-init", "WSD", "inverse-square-root", "warmup-fraction"])
def test_lr_at_every_iteration_is_megatrons_and_the_formulas(flags, formula):
    args = args_for("--train-iters", "20", "--min-lr", "2e-5", *flags)
    for iteration, groups in enumerate(run_schedule(args)):
        (lr, _), _, (hyper_lr, _) = groups
        assert lr == megatron_reference(args, iteration * BATCH)["lr"], iteration
        assert math.isclose(lr, formula(iteration), rel_tol=1e-12, abs_tol=1e-15), iteration
        # Megatron's per-group bounds: warmup from the shared --lr-warmup-init to mult x --lr
        assert hyper_lr == megatron_reference(args, iteration * BATCH,
                                              max_lr=HYPER_MULT * args.optimizer.lr,
                                              min_lr=HYPER_MULT * args.schedule.min_lr)["lr"]
        if args.schedule.lr_warmup_init == 0:
            assert math.isclose(hyper_lr, HYPER_MULT * lr, rel_tol=1e-12), iteration


def test_sample_and_token_spans_give_the_iteration_schedule():
    """--train-samples with --lr-*-samples, and Megatron-DeepSpeed's token spans, are the same
    schedule as the iteration flags they stand for."""
    by_iters = args_for("--train-iters", "10", "--lr-warmup-iters", "2", "--lr-decay-iters", "8")
    by_samples = args_for("--train-samples", str(10 * BATCH + 3), "--lr-warmup-samples",
                          str(2 * BATCH), "--lr-decay-samples", str(8 * BATCH))
    tokens = BATCH * by_iters.data.seq_length
    by_tokens = args_for("--train-iters", "10", "--lr-warmup-tokens", str(2 * tokens),
                         "--lr-decay-tokens", str(8 * tokens))
    assert by_samples.training.train_iters == 10  # Megatron: samples // global batch
    reference = run_schedule(by_iters)
    for other in (by_samples, by_tokens):
        for a, b in zip(reference, run_schedule(other)):
            assert math.isclose(a[0][0], b[0][0], rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increments_and_spares_the_no_decay_group(style):
    args = args_for("--train-iters", "8", "--weight-decay-incr-style", style,
                    "--start-weight-decay", "0.01", "--end-weight-decay", "0.1")
    for iteration, groups in enumerate(run_schedule(args)):
        ratio = iteration / 8
        coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1)
        (_, wd), (_, no_wd), (_, hyper_wd) = groups
        assert math.isclose(wd, 0.01 + coeff * 0.09, rel_tol=1e-12), iteration
        assert wd == megatron_reference(args, iteration * BATCH)["weight_decay"]
        assert no_wd == 0.0 and hyper_wd == wd


def test_constant_weight_decay_is_weight_decay():
    groups = run_schedule(args_for("--train-iters", "3", "--weight-decay", "0.05"))
    assert {(g[0][1], g[1][1]) for g in groups} == {(0.05, 0.0)}


def resumed(run_flags, checkpoint_flags, *resume_flags, iterations=5):
    """A schedule saved after ``iterations`` by one run, loaded by another."""
    saved = LRSchedule(optimizer_like_the_trainers(0.0), args_for(*checkpoint_flags))
    saved.step(iterations * BATCH)
    optimizer = optimizer_like_the_trainers(0.0)
    schedule = LRSchedule(optimizer, args_for(*run_flags, *resume_flags))
    schedule.load_state_dict(saved.state_dict())
    return schedule, optimizer


def test_resume_continues_the_schedule_and_reapplies_the_group_multiplier():
    flags = ["--train-iters", "10", "--lr-warmup-iters", "2"]
    schedule, optimizer = resumed(flags, flags)
    expected = megatron_reference(args_for(*flags), 5 * BATCH)["lr"]
    assert optimizer.param_groups[0]["lr"] == expected
    assert math.isclose(optimizer.param_groups[2]["lr"], HYPER_MULT * expected, rel_tol=1e-12)


def test_resume_with_another_schedule_needs_a_choice():
    """Megatron's semantics: the flags must agree with the checkpoint, unless
    --override-opt_param-scheduler (the flags win) or --use-checkpoint-opt_param-scheduler."""
    old, new = ["--train-iters", "10", "--lr", "1e-3"], ["--train-iters", "10", "--lr", "5e-4"]
    with pytest.raises(CheckpointError, match=re.escape(
            "schedule has max_lr=0.001 but the flags give 0.0005 (--lr): pass "
            "--override-opt_param-scheduler")) as error:
        resumed(new, old)
    assert "\n" not in str(error.value)
    _, optimizer = resumed(new, old, "--override-opt_param-scheduler")
    assert optimizer.param_groups[0]["lr"] == megatron_reference(args_for(*new), 5 * BATCH)["lr"]
    _, optimizer = resumed(new, old, "--use-checkpoint-opt_param-scheduler")
    assert optimizer.param_groups[0]["lr"] == megatron_reference(args_for(*old), 5 * BATCH)["lr"]
    assert optimizer.param_groups[2]["max_lr"] == HYPER_MULT * 1e-3


def test_checkpoint_without_scheduler_state_resumes_at_its_consumed_samples():
    args = args_for("--train-iters", "10", "--lr-warmup-iters", "2")
    optimizer = optimizer_like_the_trainers(0.0)
    LRSchedule(optimizer, args).resume_without_state(consumed_samples=6 * BATCH)
    assert optimizer.param_groups[0]["lr"] == megatron_reference(args, 6 * BATCH)["lr"]


@pytest.mark.parametrize("flags,message", [
    (["--train-iters", "4", "--train-samples", "16"],
     "--train-samples and --train-iters are exclusive"),
    (["--train-iters", "4", "--lr-decay-samples", "8"],
     "--lr-decay-samples does not fit a run that counts iterations (--train-iters): use "
     "--lr-decay-iters"),
    (["--train-samples", "16", "--lr-warmup-iters", "2"],
     "--lr-warmup-iters does not fit a run that counts samples (--train-samples): use "
     "--lr-warmup-samples"),
    (["--train-iters", "4", "--lr-warmup-iters", "1", "--lr-warmup-fraction", "0.1"],
     "--lr-warmup-iters and --lr-warmup-fraction are exclusive"),
    (["--train-iters", "4", "--lr-decay-style", "WSD"],
     "--lr-decay-style WSD needs the annealing length: add --lr-wsd-decay-iters"),
    (["--train-iters", "4", "--lr-wsd-decay-iters", "2"],
     "--lr-wsd-decay-iters applies to --lr-decay-style WSD only"),
    (["--train-iters", "4", "--lr-wsd-decay-style", "linear"],
     "--lr-wsd-decay-style applies to --lr-decay-style WSD only"),
    (["--train-iters", "4", "--start-weight-decay", "0.1"],
     "--start-weight-decay needs --weight-decay-incr-style linear or cosine"),
    (["--train-iters", "4", "--weight-decay-incr-style", "linear"],
     "needs --start-weight-decay and --end-weight-decay"),
    (["--train-iters", "4", "--lr-warmup-init", "1"], "--lr-warmup-init 1.0 exceeds --lr"),
    (["--train-iters", "4", "--lr-decay-tokens", "100", "--lr-decay-iters", "3"],
     "--lr-decay-tokens replaces --lr-decay-iters"),
    (["--train-iters", "4", "--override-opt_param-scheduler",
      "--use-checkpoint-opt-param-scheduler"], "are exclusive: pick one"),
])
def test_bad_schedule_flags_are_refused_in_one_line(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as error:
        args_for(*flags)
    assert "\n" not in str(error.value)


def test_a_warmup_longer_than_the_decay_is_refused_before_training():
    args = args_for("--train-iters", "4", "--lr-warmup-iters", "4")
    with pytest.raises(ArgumentError, match="the warmup .* must end before the decay span"):
        LRSchedule(optimizer_like_the_trainers(0.0), args)
