"""One interface over the two forms of a model the tools accept: ``--load`` one of our
checkpoints (any TP/EP layout, rebuilt whole in this process) or ``--hf`` a Hugging Face
directory. Both give the tokenizer they were trained with."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

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


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Which model a tool reads (cli/model_source_flags.py): a checkpoint directory ``load``
    (its newest iteration, or ``iteration``; ``tokenizer_model`` where the tokenizer file has
    moved), or a Hugging Face directory ``hf``."""
    load: Optional[str] = None
    iteration: Optional[int] = None
    tokenizer_model: Optional[str] = None
    hf: Optional[str] = None


def build_megatron_model(checkpoint):
    """The checkpoint's model in this process (megatron parallel state initialised, TP=EP=1),
    in eval mode, with its config."""
    from megatron_hypermoe.model.gpt import build_gpt_model

    run = checkpoint.single_process_run()
    config = run.model
    model = build_gpt_model(config, run.embedding.padded_vocab_size,
                            run.embedding.max_position_embeddings)
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


def load_model(source: ModelSource) -> LoadedModel:
    """From ``--load`` (with ``--iteration``, ``--tokenizer-model``) or ``--hf``."""
    if source.load:
        from megatron_hypermoe.data.tokenizer_files import checked_training_tokenizer
        from megatron_hypermoe.parallel.distributed import initialize_distributed
        from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

        checkpoint = read_checkpoint(source.load, source.iteration)
        trained = checkpoint.run
        _, tokenizer = checked_training_tokenizer(
            trained.tokenizer, checkpoint.meta.get("tokenizer"), source.tokenizer_model)
        initialize_distributed(seed=trained.training.seed)
        model, _ = build_megatron_model(checkpoint)
        return LoadedModel("megatron", model, tokenizer,
                           trained.embedding.max_position_embeddings, int(tokenizer.vocab_size),
                           source.load)
    from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer

    model = load_hf_model(source.hf)
    _, tokenizer = hf_directory_tokenizer(source.hf)
    return LoadedModel("hf", model, tokenizer, model.config.max_position_embeddings,
                       int(tokenizer.vocab_size), source.hf)


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
