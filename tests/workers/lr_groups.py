"""Run under torchrun: the trainer's optimizer groups get exactly the intended learning rate at
every step, the hypernetwork's generating weights ``lr x --hyper-lr-mult``, under DeepSpeed ZeRO
with the layout given on the command line, and again after resuming from a checkpoint.

    torchrun --nproc_per_node 2 tests/workers/lr_groups.py --save DIR -- <layout flags>
Exits non-zero (AssertionError) on any difference.
"""

import argparse
import os

from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.arguments import parse_args
from megatron_hypermoe.training.lr_schedule import learning_rate
from megatron_hypermoe.training.trainer import Trainer
from tests.helpers import TINY_MODEL

STEPS_BEFORE_SAVE, STEPS = 3, 5


def check_group_lrs(trainer):
    """Every group's lr is the schedule's at the step just taken, times its multiplier."""
    expected = learning_rate(trainer.state.iteration, trainer.args)
    groups = trainer.optimizer.param_groups
    assert any(g.get("lr_mult") == 1 / 16 for g in groups), [g.get("name") for g in groups]
    for group in groups:
        assert group["lr"] == expected * group.get("lr_mult", 1.0), (group.get("name"),
                                                                      group["lr"], expected)


def train(flags, steps_from, steps_to):
    trainer = Trainer(parse_args(flags, int(os.environ["WORLD_SIZE"])))
    trainer.setup()
    assert trainer.state.iteration == steps_from
    batches = iter(trainer.train_loader())
    while trainer.state.iteration < steps_to:
        trainer.train_step(batches)
        check_group_lrs(trainer)
        trainer.state.iteration += 1
        trainer.state.consumed_train_samples += trainer.args.global_batch_size
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
