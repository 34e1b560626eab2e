"""Every RNG state of a rank (python, numpy, torch, CUDA, megatron's model-parallel streams) in
one safetensors file per rank: ``rng_rank_RRRRR.safetensors``."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.parallel.distributed import global_rank


def rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng_rank_{rank:05d}.safetensors")


def save_rng_state(directory: str) -> None:
    from megatron.core import tensor_parallel
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = state.cpu() if torch.is_tensor(state) else \
            torch.tensor(state)
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    metadata = {
        "python_random": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached)]),
    }
    save_file(tensors, rng_path(directory, global_rank()), metadata=metadata)


def load_rng_state(directory: str) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    from megatron.core import tensor_parallel
    from safetensors import safe_open

    path = rng_path(directory, global_rank())
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors' own error class, or an OSError
        raise CheckpointError.damaged_file(path, error) from None
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker_states = {k.split("/", 1)[1]: v for k, v in tensors.items()
                      if k.startswith("tracker/")}
    if tracker_states:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)
    kind, position, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position,
                         has_gauss, cached))
    version, internal, gauss = json.loads(metadata["python_random"])
    random.setstate((version, tuple(internal), gauss))
    return True
