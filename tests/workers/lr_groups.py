"""Run under torchrun: the trainer's optimizer groups get exactly the intended learning rate at
every step, the hypernetwork's generating weights ``lr x --hyper-lr-mult``, under DeepSpeed ZeRO
with the layout given on the command line, and again after resuming from a checkpoint. The
groups checked are those of the torch optimizer DeepSpeed steps.

    torchrun --nproc_per_node 2 tests/workers/lr_groups.py --save DIR -- <layout flags>
Exits non-zero (AssertionError) on any difference.
"""

import argparse
import math
import os

from megatron_hypermoe.cli.arguments import parse_run_config
from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.trainer import Trainer
from tests.support.tiny_model import TINY_MODEL

STEPS_BEFORE_SAVE, STEPS = 3, 5


def megatron_lr(run, num_steps):
    """megatron-core's scheduler alone, on a stand-in optimizer, at the same step."""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_hypermoe.training.lr_schedule import scheduler_steps

    stand_in = SimpleNamespace(param_groups=[{}])
    scheduler = OptimizerParamScheduler(
        stand_in, init_lr=run.schedule.lr_warmup_init, max_lr=run.optimizer.lr,
        min_lr=run.schedule.min_lr, lr_decay_style=run.schedule.lr_decay_style,
        start_wd=run.schedule.start_weight_decay, end_wd=run.schedule.end_weight_decay,
        wd_incr_style=run.schedule.weight_decay_incr_style, **scheduler_steps(run))
    scheduler.step(num_steps)
    return stand_in.param_groups[0]["lr"]


def check_group_lrs(trainer):
    """Every group's lr is the schedule's at the next step, times its multiplier."""
    run = trainer.run
    expected = megatron_lr(run, (trainer.state.iteration + 1) * run.training.global_batch_size)
    groups = trainer.optimizer.param_groups
    assert groups is trainer.optimizer.optimizer.param_groups  # the groups DeepSpeed steps
    assert any(g.get("lr_mult") == 1 / 16 for g in groups), [g.get("name") for g in groups]
    assert expected > 0 or trainer.state.iteration + 1 == run.training.train_iters  # then min-lr 0
    for group in groups:
        assert math.isclose(group["lr"], expected * group.get("lr_mult", 1.0), rel_tol=1e-12), \
            (group.get("name"), group["lr"], expected)


def train(flags, steps_from, steps_to):
    trainer = Trainer(parse_run_config(flags, int(os.environ["WORLD_SIZE"])))
    trainer.setup()
    assert trainer.state.iteration == steps_from
    batches = iter(trainer.train_loader())
    while trainer.state.iteration < steps_to:
        trainer.train_step(batches)
        check_group_lrs(trainer)
        trainer.state.iteration += 1
        trainer.state.consumed_train_samples += trainer.run.training.global_batch_size
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", required=True)
    parser.add_argument("layout", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    flags = [*TINY_MODEL, "--mock-data", "--train-iters", str(STEPS), "--lr-warmup-iters", "2",
             "--hyper-lr-mult", "1/d_g", "--global-batch-size", "4", *args.layout]
    trainer = train(flags + ["--save", args.save], 0, STEPS_BEFORE_SAVE)
    trainer.save()
    train(flags + ["--load", args.save], STEPS_BEFORE_SAVE, STEPS)
    destroy_distributed()


if __name__ == "__main__":
    main()
