"""One interface over the two forms of a model the tools accept: ``--load`` one of our
checkpoints (any TP/EP layout, rebuilt whole in this process) or ``--hf`` a Hugging Face
directory. Both give the tokenizer they were trained with."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import torch

from megatron_hypermoe.errors import CheckpointError


@dataclasses.dataclass
class LoadedModel:
    kind: str  # "megatron" or "hf"
    model: Any
    tokenizer: Any
    max_sequence_length: int
    vocab_size: int  # real tokens (padded rows excluded)
    source: str = ""  # the directory it was loaded from


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


def build_megatron_model(checkpoint):
    """The checkpoint's model in this process (megatron parallel state initialised, TP=EP=1),
    in eval mode, with its config."""
    from megatron_hypermoe.model.gpt import build_gpt_model

    args = checkpoint.single_process_args()
    config = checkpoint.model_config()
    model = build_gpt_model(config, args.padded_vocab_size, args.max_position_embeddings)
    missing, unexpected = model.load_state_dict(checkpoint.state, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.directory} does not fit the model it describes "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config


def load_hf_model(directory: str):
    """An exported (or any Llama/Mixtral/HyperMoE) directory as an fp32 transformers model."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no "
                              "config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                 dtype=torch.float32)
    # on the GPU when there is one, as a --load checkpoint is (build_gpt_model)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def load_model(args) -> LoadedModel:
    """From ``--load`` (with ``--iteration``, ``--tokenizer-model``) or ``--hf``."""
    if args.load:
        from megatron_hypermoe.data.tokenizer_files import checked_training_tokenizer
        from megatron_hypermoe.parallel.distributed import initialize_distributed
        from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

        checkpoint = read_checkpoint(args.load, args.iteration)
        _, tokenizer = checked_training_tokenizer(
            checkpoint.args, checkpoint.meta.get("tokenizer"), args.tokenizer_model)
        initialize_distributed(seed=checkpoint.args.seed)
        model, _ = build_megatron_model(checkpoint)
        return LoadedModel("megatron", model, tokenizer,
                           checkpoint.args.max_position_embeddings, int(tokenizer.vocab_size),
                           args.load)
    from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer

    model = load_hf_model(args.hf)
    _, tokenizer = hf_directory_tokenizer(args.hf)
    return LoadedModel("hf", model, tokenizer, model.config.max_position_embeddings,
                       int(tokenizer.vocab_size), args.hf)


def as_megatron_callable(loaded: LoadedModel):
    """A module called like megatron's GPTModel (tokens, positions, mask) -> logits, for
    :func:`megatron_hypermoe.model.generation.generate_ids`."""
    if loaded.kind == "megatron":
        return loaded.model

    class HuggingFaceLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, positions, mask):
            return self.model(input_ids=tokens, position_ids=positions, use_cache=False).logits

    return HuggingFaceLogits(loaded.model)
