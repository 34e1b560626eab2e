#!/usr/bin/env python
"""Convert a Hugging Face Llama / Mixtral / Qwen2-MoE / Qwen3-MoE / HyperMoE directory to a
megatron-hypermoe checkpoint (iteration 0, fresh optimizer). Run under torchrun for TP/EP > 1.

    python tools/convert_hf_to_checkpoint.py --hf hf/demo --save converted
    python tools/convert_hf_to_checkpoint.py --hf my_llama --save upcycled \\
        --upcycle --moe-type hypermoe --num-experts 8 --moe-router-topk 2
    python tools/convert_hf_to_checkpoint.py --hf my_qwen3_moe --save upcycled \\
        --upcycle --moe-type hypermoe          # an MoE keeps its experts and routing

See ``megatron_hypermoe/conversion/import_hf.py``.
"""

import argparse
import os
import sys

import torch

from megatron_hypermoe.cli.arguments import (
    add_hyper_size_args,
    hyper_lr_mult_value,
    run_config_for_model,
)
from megatron_hypermoe.conversion.import_hf import import_hf
from megatron_hypermoe.errors import CheckpointError, exit_on_user_error
from megatron_hypermoe.model.config import HYPER_INITS, HYPER_SIZE_NAMES
from megatron_hypermoe.parallel.distributed import destroy_distributed


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True, help="new checkpoint directory")
    parser.add_argument("--upcycle", action="store_true",
                        help="add what --moe-type has and the model lacks: from a dense Llama, "
                             "every MLP becomes --num-experts copies with a fresh router and "
                             "side path; from an MoE (Mixtral, Qwen2-MoE, Qwen3-MoE), its "
                             "experts, router and shared expert are kept and the HyperMoE "
                             "hypernetwork (or the static adapter) is added with an output of "
                             "exactly 0, so the model computes what it did until it trains")
    group = parser.add_argument_group("the MoE when upcycling (otherwise they come from the "
                                      "model; an MoE source's experts, top-k and routing "
                                      "cannot be changed)")
    group.add_argument("--moe-type", choices=("hypermoe", "moe", "moe_adapter"), default=None)
    group.add_argument("--num-experts", type=int, default=None)
    group.add_argument("--moe-router-topk", type=int, default=None)
    group.add_argument("--moe-router-pre-softmax", action=argparse.BooleanOptionalAction,
                       default=None, help="as for pretrain_gpt_hypermoe.py")
    group.add_argument("--moe-router-renormalize", action="store_true", default=None,
                       help="as for pretrain_gpt_hypermoe.py")
    add_hyper_size_args(group, default_from_model=True)
    group.add_argument("--hyper-init", choices=HYPER_INITS, default=None)
    group.add_argument("--hyper-lr-mult", type=hyper_lr_mult_value, default=None)
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
    upcycle_fields = dict(num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                          moe_router_pre_softmax=args.moe_router_pre_softmax,
                          moe_router_renormalize=args.moe_router_renormalize,
                          hyper_init=args.hyper_init,
                          **{name: getattr(args, name) for name in HYPER_SIZE_NAMES})
    import_hf(args.hf, args.save, upcycle=args.upcycle, moe_type=args.moe_type,
              upcycle_fields=upcycle_fields, hyper_lr_mult=args.hyper_lr_mult,
              tensor_model_parallel_size=args.tensor_model_parallel_size,
              expert_model_parallel_size=args.expert_model_parallel_size,
              zero_stage=args.zero_stage, seed=args.seed,
              run_config_for_model=run_config_for_model)
    destroy_distributed()
    print(f"wrote checkpoint {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
