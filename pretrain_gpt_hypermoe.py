#!/usr/bin/env python
"""Pretrain a HyperMoE (or MoE, or dense) GPT with megatron-core and DeepSpeed.

    deepspeed --num_gpus 8 pretrain_gpt_hypermoe.py --moe-type hypermoe ... (see examples/)
    torchrun --nproc_per_node 2 pretrain_gpt_hypermoe.py ...
    python pretrain_gpt_hypermoe.py ...           (one process; CPU works)

Run with --help for the flags (Megatron-LM's names).
"""

import sys

from megatron_hypermoe.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
