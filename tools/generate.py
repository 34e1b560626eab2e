#!/usr/bin/env python
"""Generate text from a checkpoint (--load) or Hugging Face directory (--hf).

    python tools/generate.py --hf hf/demo --prompt "ROMEO." --max-new-tokens 64 --top-p 0.9
"""

import argparse
import sys

import torch

from megatron_hypermoe.cli.model_source_flags import add_model_source_args, model_source
from megatron_hypermoe.errors import ArgumentError, exit_on_user_error
from megatron_hypermoe.inference.model_source import as_megatron_callable, load_model
from megatron_hypermoe.model.generation import generate_ids


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate text from a checkpoint (--load) or Hugging Face directory (--hf):"
                    " greedy or nucleus (top-p) sampling.")
    add_model_source_args(parser)
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if not 0.0 < args.top_p <= 1.0 or args.temperature <= 0:
        raise ArgumentError("--top-p must be in (0, 1] and --temperature positive")
    loaded = load_model(model_source(args))
    tokenizer = loaded.tokenizer
    prompt = tokenizer.tokenize(args.prompt) or [tokenizer.eod]
    new = generate_ids(as_megatron_callable(loaded), prompt, args.max_new_tokens,
                       loaded.max_sequence_length, greedy=args.greedy, top_p=args.top_p,
                       temperature=args.temperature, eod=tokenizer.eod,
                       generator=torch.Generator().manual_seed(args.seed),
                       vocab_size=loaded.vocab_size)
    print(tokenizer.detokenize(prompt + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
