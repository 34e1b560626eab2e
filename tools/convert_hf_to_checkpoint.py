#!/usr/bin/env python
"""Convert a Hugging Face Llama / Mixtral / HyperMoE directory to a megatron-hypermoe checkpoint
(iteration 0, fresh optimizer). Run under torchrun for TP/EP > 1.

    python tools/convert_hf_to_checkpoint.py --hf hf/demo --save converted
    python tools/convert_hf_to_checkpoint.py --hf my_llama --save upcycled \\
        --upcycle --moe-type hypermoe --num-experts 8 --moe-router-topk 2

See ``megatron_hypermoe/conversion/import_hf.py``.
"""

import argparse
import os
import sys

import torch

from megatron_hypermoe.conversion.import_hf import import_hf
from megatron_hypermoe.errors import CheckpointError, exit_on_user_error
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES
from megatron_hypermoe.parallel.distributed import destroy_distributed
from megatron_hypermoe.training.arguments import add_hyper_size_args


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True, help="new checkpoint directory")
    parser.add_argument("--upcycle", action="store_true",
                        help="dense Llama -> MoE/HyperMoE: every MLP becomes --num-experts "
                             "copies, with a fresh router and hyper path")
    parser.add_argument("--moe-type", choices=("hypermoe", "moe", "moe_adapter"), default=None)
    parser.add_argument("--num-experts", type=int, default=None)
    parser.add_argument("--moe-router-topk", type=int, default=None)
    add_hyper_size_args(parser.add_argument_group("HyperMoE sizes when upcycling"),
                        default_from_model=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=1, choices=(1, 2),
                        help="the ZeRO stage of the runs that will --load it")
    parser.add_argument("--seed", type=int, default=1234, help="fresh weights when upcycling")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the trainer does
    if os.path.exists(args.save) and os.listdir(args.save):
        raise CheckpointError(f"--save {args.save} exists and is not empty: choose a new "
                              "directory")
    import_hf(args.hf, args.save, upcycle=args.upcycle, moe_type=args.moe_type,
              num_experts=args.num_experts, topk=args.moe_router_topk,
              hyper_sizes={name: getattr(args, name) for name in HYPER_SIZE_NAMES},
              tensor_model_parallel_size=args.tensor_model_parallel_size,
              expert_model_parallel_size=args.expert_model_parallel_size,
              zero_stage=args.zero_stage, seed=args.seed)
    destroy_distributed()
    print(f"wrote checkpoint {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
