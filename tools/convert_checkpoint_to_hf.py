#!/usr/bin/env python
"""Convert a megatron-hypermoe checkpoint (any TP/EP layout) to a Hugging Face directory:
dense -> Llama, moe -> Mixtral (or, with a shared expert, qkv bias, q/k norm or dense layers,
Qwen2-MoE / Qwen3-MoE), hypermoe -> HyperMoE (trust_remote_code).

    python tools/convert_checkpoint_to_hf.py --load runs/demo/checkpoints --output hf/demo

See ``megatron_hypermoe/conversion/export.py``.
"""

import argparse
import sys

from megatron_hypermoe.conversion.export import export_checkpoint
from megatron_hypermoe.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (a run's --save)")
    parser.add_argument("--output", required=True, help="new Hugging Face directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--tokenizer-model", default=None,
                        help="the training tokenizer, if it is no longer where training read it")
    args = parser.parse_args(argv)
    config = export_checkpoint(args.load, args.output, args.iteration, args.tokenizer_model)
    print(f"wrote {config['architectures'][0]} ({config['num_hidden_layers']} layers) to "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
