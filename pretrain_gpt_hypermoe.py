#!/usr/bin/env python
"""Pretrain a HyperMoE (or MoE, or dense) GPT with megatron-core and DeepSpeed.

    deepspeed --num_gpus 8 pretrain_gpt_hypermoe.py --moe-type hypermoe ... (see examples/)
    torchrun --nproc_per_node 2 pretrain_gpt_hypermoe.py ...
    python pretrain_gpt_hypermoe.py ...           (one process; CPU works)

Run with --help for the flags (Megatron-LM's names). The loop is
``megatron_hypermoe/training/trainer.py``.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_hypermoe.cli.arguments import parse_args, run_config
from megatron_hypermoe.errors import UserError, exit_on_user_error
from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.trainer import Trainer


@exit_on_user_error
def main(argv=None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.local_rank is not None:
        # An older deepspeed launcher passes --local_rank only; a newer one also sets the
        # variable, which then agrees.
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    run = run_config(args)
    trainer = Trainer(run)
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    try:
        trainer.setup()
        if run.training.eval_only:
            trainer.log_evaluation(trainer.evaluate())
        elif trainer.train():
            trainer.finish()
        if trainer.peers is not None:
            trainer.peers.stop()
        # Leave together: a rank that exits while its peer is still inside a gloo collective
        # makes the peer abort.
        dist.barrier()
        destroy_distributed()
        return 0
    except UserError:
        raise
    except Exception as error:
        # A killed or silent peer: one line naming it, not a traceback on every rank.
        lost = trainer.peers.lost_peer_error(error) if trainer.peers is not None else None
        if lost is None:
            raise
        raise lost from None
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
