"""The tools' flags naming the model to read: a checkpoint (--load, --iteration) or a Hugging
Face directory (--hf)."""

from __future__ import annotations

import argparse

from megatron_hypermoe.inference.model_source import ModelSource


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="our checkpoint directory (the --save of a run)")
    source.add_argument("--hf", help="a Hugging Face model directory")
    add_checkpoint_choice_args(parser)


def add_checkpoint_choice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iteration", type=int, default=None,
                        help="with --load: this iteration instead of the latest")
    parser.add_argument("--tokenizer-model", default=None,
                        help="with --load: the training tokenizer, if it moved")


def model_source(args) -> ModelSource:
    """The model the flags name."""
    return ModelSource(load=args.load, iteration=getattr(args, "iteration", None),
                       tokenizer_model=getattr(args, "tokenizer_model", None),
                       hf=getattr(args, "hf", None))
