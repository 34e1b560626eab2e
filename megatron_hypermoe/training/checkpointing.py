"""Checkpoints: DeepSpeed's format plus our metadata, written atomically, loaded safely.

Layout under --save (DeepSpeed's, plus three kinds of files of ours)::

    latest                          the tag of the newest COMPLETE checkpoint (DeepSpeed reads it)
    latest_checkpointed_iteration.txt   the same as an iteration number (Megatron's file)
    iter_0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   (DeepSpeed)
        experts_ep_rank_00001_tp_rank_00.safetensors   with EP > 1: each EP (x expert-TP) rank's
                                    experts by global id
        hypermoe_checkpoint.json    arguments, iteration, consumed samples, model shape, the
                                    learning-rate scheduler's state (Megatron's)
        rng_rank_00000.safetensors  every RNG state of that rank (python, numpy, torch, CUDA,
                                    megatron's model-parallel streams)
        layout_free/                the training state by global parameter name, for a resume in
                                    another layout (training/layout_free_checkpoint.py)

Atomic: every rank writes into ``iter_N.partial/``; after a barrier rank 0 renames it to
``iter_N/`` and only then moves ``latest`` (write-to-temp then rename). A crash at any point
leaves ``latest`` on the previous complete checkpoint.

Safe: our files are JSON and safetensors. DeepSpeed's .pt files are read through a checkpoint
engine that unpickles with ``weights_only=True`` and allows only DeepSpeed's plain record
classes (``compat/deepspeed.py``), so a tampered file cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_hypermoe.compat.deepspeed import install_weights_only_checkpoint_engine
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.model.config import HYPER_SIZE_NAMES
from megatron_hypermoe.training.arguments import hyper_lr_mult, recorded_args
from megatron_hypermoe.training.expert_checkpoint import (restore_local_experts,
                                                          save_local_experts)
from megatron_hypermoe.training.layout_free_checkpoint import (needs_reshard,
                                                               restore_layout_free,
                                                               rng_carries_over, save_layout_free,
                                                               vocab_padding_message)
from megatron_hypermoe.training.lr_schedule import SCHEDULER_STATE_KEY
from megatron_hypermoe.training.metrics import jsonable_args

CHECKPOINT_FORMAT = "megatron-hypermoe-checkpoint"
CHECKPOINT_VERSION = 1
META_FILE = "hypermoe_checkpoint.json"
LATEST_FILE = "latest"
MEGATRON_LATEST_FILE = "latest_checkpointed_iteration.txt"

# Fields a checkpoint must match; --finetune may not change them either. The parallel layout is
# not one: layout_free_checkpoint.py loads any layout's checkpoint into any other.
SHAPE_FIELDS = (
    "moe_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "num_experts", "moe_router_topk", "padded_vocab_size",
    "max_position_embeddings", *HYPER_SIZE_NAMES,
)


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# RNG state ----------------------------------------------------------------------------------------
def _rng_path(directory: str, rank: int) -> str:
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
    save_file(tensors, _rng_path(directory, _rank()), metadata=metadata)


def load_rng_state(directory: str) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    from megatron.core import tensor_parallel
    from safetensors import safe_open

    path = _rng_path(directory, _rank())
    if not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
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


# Save ---------------------------------------------------------------------------------------------
def checkpoint_shape(args) -> dict:
    """The values of SHAPE_FIELDS, which a checkpoint records and a load must match."""
    return {field: getattr(args, field, None) for field in SHAPE_FIELDS}


def save_checkpoint(engine, args, state: TrainState, tokenizer: Optional[dict] = None,
                    schedule=None) -> str:
    """Save on every rank (collective). Returns the final checkpoint directory. ``tokenizer``
    (its fingerprint: type, vocab size, file hashes) lets converters refuse a mismatched one;
    ``schedule`` (training/lr_schedule.py) is saved as Megatron saves its scheduler."""
    tag = tag_for(state.iteration)
    partial_tag = tag + ".partial"
    final_dir = os.path.join(args.save, tag)
    partial_dir = os.path.join(args.save, partial_tag)
    if _rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        if os.path.isdir(partial_dir):
            shutil.rmtree(partial_dir)  # left by a crash during an earlier save
    _barrier()
    engine.save_checkpoint(args.save, tag=partial_tag, client_state={}, save_latest=False)
    save_rng_state(partial_dir)
    save_layout_free(engine, args, partial_dir)
    if args.expert_model_parallel_size > 1:
        save_local_experts(engine.module, partial_dir, args.num_experts)
    if _rank() == 0:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "tag": tag,
            "train_state": dataclasses.asdict(state),
            "model": checkpoint_shape(args),
            "world_size": args.world_size,
            "data_parallel_size": args.data_parallel_size,
            "args": jsonable_args(args),
            "tokenizer": tokenizer,
        }
        if schedule is not None:
            meta[SCHEDULER_STATE_KEY] = schedule.state_dict()
        _atomic_write_text(os.path.join(partial_dir, META_FILE), json.dumps(meta, indent=1))
    _barrier()
    if _rank() == 0:
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        _atomic_write_text(os.path.join(args.save, LATEST_FILE), tag)
        _atomic_write_text(os.path.join(args.save, MEGATRON_LATEST_FILE), str(state.iteration))
    _barrier()
    return final_dir


# Load ---------------------------------------------------------------------------------------------
def read_latest(load_dir: str) -> tuple:
    """(tag, metadata) of the newest complete checkpoint under load_dir."""
    latest = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir} does not exist")
    if not os.path.isfile(latest):
        raise CheckpointError(f"--load {load_dir} is not a checkpoint directory (no "
                              f"'{LATEST_FILE}' file); point it at a --save directory")
    with open(latest) as handle:
        tag = handle.read().strip()
    meta_path = os.path.join(load_dir, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag} has no {META_FILE}; it was "
                              "not written by this trainer or is incomplete")
    with open(meta_path) as handle:
        try:
            meta = json.load(handle)
        except json.JSONDecodeError:
            raise CheckpointError(f"{meta_path} is not valid JSON") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {CHECKPOINT_FORMAT} file")
    return tag, meta


def check_model_shape(meta: dict, args) -> None:
    saved, current = meta.get("model", {}), checkpoint_shape(args)
    for field in SHAPE_FIELDS:
        if field in saved and saved[field] != current[field]:
            if field == "padded_vocab_size":  # TP is part of Megatron's vocabulary padding
                raise CheckpointError(vocab_padding_message(meta, args))
            flag = "--" + field.replace("_", "-")
            raise CheckpointError(f"checkpoint has {field}={saved[field]!r} but the flags give "
                                  f"{current[field]!r}: pass {flag} {saved[field]} or load "
                                  "another checkpoint")


def check_optimizer_groups(meta: dict, args) -> None:
    """DeepSpeed's optimizer files hold one flat partition per parameter group: a run whose
    groups differ (--hyper-lr-mult 1 has no group of its own, any other value has) cannot take
    them."""
    recorded = recorded_args(meta.get("args", {}))
    saved = hyper_lr_mult(recorded)
    as_passed = recorded.hyper_lr_mult  # a number, or the rule it was given as
    as_passed = as_passed if isinstance(as_passed, str) else f"{as_passed:g}"
    if (saved != 1.0) != (hyper_lr_mult(args) != 1.0):
        raise CheckpointError(f"checkpoint was trained with --hyper-lr-mult {saved:g}, this run "
                              f"has {hyper_lr_mult(args):g}: the optimizer's parameter groups "
                              f"differ; pass --hyper-lr-mult {as_passed} to keep "
                              "the checkpoint's, or add --no-load-optim to start the optimizer "
                              "and the learning-rate schedule afresh")


def load_checkpoint(engine, args, schedule=None) -> TrainState:
    """Restore weights, optimizer, RNG, the train state and, with the optimizer, the
    learning-rate schedule (collective). As in Megatron, --finetune and --no-load-optim start
    the schedule afresh."""
    tag, meta = read_latest(args.load)
    check_model_shape(meta, args)
    load_optimizer = not (args.finetune or args.no_load_optim)
    directory = os.path.join(args.load, tag)
    if needs_reshard(meta, args, directory, load_optimizer):  # another layout
        restore_layout_free(engine, directory, load_optimizer)
    else:
        _load_same_layout(engine, args, tag, load_optimizer, meta)
    if args.finetune:
        return TrainState()
    if not args.no_load_rng and rng_carries_over(meta, args):
        load_rng_state(directory)
    state = TrainState(**meta["train_state"])
    if load_optimizer and schedule is not None:
        if SCHEDULER_STATE_KEY in meta:
            schedule.load_state_dict(meta[SCHEDULER_STATE_KEY])
        else:  # written before the scheduler was saved
            schedule.resume_without_state(state.consumed_train_samples)
    return state


def _load_same_layout(engine, args, tag: str, load_optimizer: bool, meta: dict) -> None:
    """DeepSpeed's own files (and our expert files), in the layout that wrote them."""
    if load_optimizer:
        check_optimizer_groups(meta, args)
    install_weights_only_checkpoint_engine(engine)
    path, _ = engine.load_checkpoint(args.load, tag=tag, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=False,
                                     load_module_only=not load_optimizer)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint {tag} under {args.load}")
    if args.expert_model_parallel_size > 1:
        restore_local_experts(engine, os.path.join(args.load, tag), args.num_experts)


def latest_iteration(load_dir: Optional[str]) -> Optional[int]:
    """The newest complete checkpoint's iteration, or None if load_dir has none (yet)."""
    if not load_dir or not os.path.isfile(os.path.join(load_dir, LATEST_FILE)):
        return None
    _, meta = read_latest(load_dir)
    return meta["train_state"]["iteration"]
