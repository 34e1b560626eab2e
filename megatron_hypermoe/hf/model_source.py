"""One interface over the two forms of a model the tools accept: ``--load`` one of our
checkpoints (any TP/EP layout, rebuilt whole in this process) or ``--hf`` a Hugging Face
directory. Both give the tokenizer they were trained with."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


@dataclasses.dataclass
class LoadedModel:
    kind: str  # "megatron" or "hf"
    model: Any
    tokenizer: Any
    max_sequence_length: int
    vocab_size: int  # real tokens (padded rows excluded)


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="our checkpoint directory (the --save of a run)")
    source.add_argument("--hf", help="a Hugging Face model directory")
    parser.add_argument("--iteration", type=int, default=None,
                        help="with --load: this iteration instead of the latest")
    parser.add_argument("--tokenizer-model", default=None,
                        help="with --load: the training tokenizer, if it moved")


def load_model(args) -> LoadedModel:
    if args.load:
        from megatron_hypermoe.hf.export import build_megatron_model
        from megatron_hypermoe.hf.tokenizer_files import checked_training_tokenizer
        from megatron_hypermoe.parallel import initialize_distributed
        from megatron_hypermoe.training.checkpoint_reader import read_checkpoint

        checkpoint = read_checkpoint(args.load, args.iteration)
        _, tokenizer = checked_training_tokenizer(
            checkpoint.args, checkpoint.meta.get("tokenizer"), args.tokenizer_model)
        initialize_distributed(seed=checkpoint.args.seed)
        model, _ = build_megatron_model(checkpoint)
        return LoadedModel("megatron", model, tokenizer,
                           checkpoint.args.max_position_embeddings, int(tokenizer.vocab_size))
    from megatron_hypermoe.hf.export import load_hf_model
    from megatron_hypermoe.hf.tokenizer_files import hf_directory_tokenizer

    model = load_hf_model(args.hf)
    _, tokenizer = hf_directory_tokenizer(args.hf)
    return LoadedModel("hf", model, tokenizer, model.config.max_position_embeddings,
                       int(tokenizer.vocab_size))


def as_megatron_callable(loaded: LoadedModel):
    """A module called like megatron's GPTModel (tokens, positions, mask) -> logits, for
    :func:`megatron_hypermoe.generation.generate_ids`."""
    if loaded.kind == "megatron":
        return loaded.model
    import torch

    class HuggingFaceLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, positions, mask):
            return self.model(input_ids=tokens, position_ids=positions, use_cache=False).logits

    return HuggingFaceLogits(loaded.model)
