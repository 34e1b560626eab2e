#!/usr/bin/env python
"""What a trained MoE / HyperMoE checkpoint does with its experts, on some text: expert-load
heatmap, selection-embedding similarity, HyperExpert contribution (PNGs, summary.txt,
analysis.json).

    python tools/analyze_experts.py runs/tiny_cpu/checkpoints --input held_out.jsonl

See ``megatron_hypermoe/inference/analysis.py`` for what each number means.
"""

import argparse
import os
import sys

from megatron_hypermoe.cli.model_source_flags import add_checkpoint_choice_args, model_source
from megatron_hypermoe.errors import exit_on_user_error
from megatron_hypermoe.inference.analysis import analyze_model, write_analysis
from megatron_hypermoe.inference.model_source import load_model


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Expert load, selection-embedding similarity and HyperExpert contribution "
                    "of a checkpoint on some text; PNGs + summary.")
    parser.add_argument("load", help="checkpoint directory (a run's --save)")
    parser.add_argument("--input", nargs="+", required=True, help="text/jsonl/... to run on")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-dir", default=None, help="default: LOAD/analysis")
    parser.add_argument("--max-tokens", type=int, default=20000)
    add_checkpoint_choice_args(parser)
    args = parser.parse_args(argv)
    args.hf = None
    loaded = load_model(model_source(args))
    summary, tokens, moe_type = analyze_model(loaded, args.input, args.json_keys,
                                              args.max_tokens)
    text, written = write_analysis(summary, tokens, moe_type,
                                   args.output_dir or os.path.join(args.load, "analysis"))
    print(text)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
