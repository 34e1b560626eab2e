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
leaves ``latest`` on the previous complete checkpoint; a write that fails on any rank (a full
disk) stops every rank with one line and removes the partial directory. Which directories count,
re-saving an iteration, ``--save-retain`` and ``--ckpt-step``: ``checkpoint_files.py``.

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
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_hypermoe.compat.deepspeed import (
    deferring_write_errors,
    install_weights_only_checkpoint_engine,
)
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.model.config import (
    HYPER_SIZE_NAMES,
    SIDE_PATH_VARIANTS,
    VARIANT_HYPER_FIELDS,
)
from megatron_hypermoe.model.initialization import zero_side_path_output_
from megatron_hypermoe.model.side_path import is_side_path_parameter
from megatron_hypermoe.training.arguments import hyper_lr_mult, recorded_args
from megatron_hypermoe.training.checkpoint_files import (  # noqa: F401 (names others import)
    LATEST_FILE,
    MEGATRON_LATEST_FILE,
    META_FILE,
    PARTIAL,
    atomic_write_text,
    other_checkpoint_hint,
    publish,
    read_latest_tag,
    remove_leftovers,
    resolve_load_tag,
    retain_newest,
    tag_for,
)
from megatron_hypermoe.training.expert_checkpoint import restore_local_experts, save_local_experts
from megatron_hypermoe.training.layout_free_checkpoint import DIRECTORY as LAYOUT_FREE_DIRECTORY
from megatron_hypermoe.training.layout_free_checkpoint import (
    gather_layout_free,
    has_layout_free_files,
    needs_reshard,
    print_rank0,
    restore_layout_free,
    rng_carries_over,
    vocab_padding_message,
)
from megatron_hypermoe.training.lr_schedule import SCHEDULER_STATE_KEY
from megatron_hypermoe.training.metrics import jsonable_args

CHECKPOINT_FORMAT = "megatron-hypermoe-checkpoint"
CHECKPOINT_VERSION = 1

# Fields a checkpoint must match; --finetune may not change them either. The parallel layout is
# not one: layout_free_checkpoint.py loads any layout's checkpoint into any other.
# Of the HyperMoE sizes, only those the variant reads (model/config.py VARIANT_HYPER_FIELDS).
SHAPE_FIELDS = (
    "moe_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "num_experts", "moe_router_topk", "padded_vocab_size",
    "max_position_embeddings", "kv_channels", "qk_layernorm", "add_qkv_bias",
    "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", *HYPER_SIZE_NAMES,
)


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


# Save ---------------------------------------------------------------------------------------------
def checkpoint_shape(args) -> dict:
    """The values of SHAPE_FIELDS, which a checkpoint records and a load must match."""
    unread = set(HYPER_SIZE_NAMES) - set(VARIANT_HYPER_FIELDS[args.moe_type])
    return {field: getattr(args, field, None) for field in SHAPE_FIELDS if field not in unread}


def save_checkpoint(engine, args, state: TrainState, tokenizer: Optional[dict] = None,
                    schedule=None) -> str:
    """Save on every rank (collective). Returns the final checkpoint directory. ``tokenizer``
    (its fingerprint: type, vocab size, file hashes) lets converters refuse a mismatched one;
    ``schedule`` (training/lr_schedule.py) is saved as Megatron saves its scheduler. A write
    that fails on any rank is a CheckpointError on every rank; nothing is published."""
    tag = tag_for(state.iteration)
    partial_dir = os.path.join(args.save, tag + PARTIAL)
    if _rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        remove_leftovers(args.save)  # left by a crash (kill -9, full disk) during earlier saves
    _barrier()
    failure = _agree(_write_partial(engine, args, state, partial_dir, tokenizer, schedule))
    if failure is None and _rank() == 0:
        try:
            publish(args.save, tag, state.iteration)
            if args.save_retain:
                retain_newest(args.save, args.save_retain)
        except OSError as error:
            failure = _failure_text(args.save, error)
    failure = _agree(failure)
    if failure is not None:
        if _rank() == 0:
            shutil.rmtree(partial_dir, ignore_errors=True)  # give the space back
        latest = read_latest_tag(args.save)
        kept = f"'{LATEST_FILE}' still names {latest}" if latest else "no checkpoint is saved yet"
        raise CheckpointError(f"saving checkpoint {tag} failed: {failure}; {kept}: free space "
                              "(or raise the file-size limit) and resume")
    return os.path.join(args.save, tag)


# What a failed write can raise: OSError from Python, RuntimeError from torch's zip writer,
# safetensors' own error class.
def _write_errors() -> tuple:
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def _failure_text(path: str, error: Exception) -> str:
    detail = (str(error).strip().splitlines() or [""])[0][:160]
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(path)).free / 1e9:.1f} GB free there"
    except OSError:
        free = ""
    return f"rank {_rank()} could not write {path} ({type(error).__name__}: {detail}{free})"


def _write_partial(engine, args, state, partial_dir, tokenizer, schedule) -> Optional[str]:
    """This rank's files into ``partial_dir``; the first failed write, described, or None."""
    with deferring_write_errors(engine) as failures:  # all ranks still pass DeepSpeed's barriers
        engine.save_checkpoint(args.save, tag=os.path.basename(partial_dir), client_state={},
                               save_latest=False)
    # Collective, so before any return: a rank whose write failed still takes part.
    write_layout_free = gather_layout_free(engine, args)
    if failures:
        return _failure_text(*failures[0])
    writes = [(_rng_path(partial_dir, _rank()), lambda: save_rng_state(partial_dir))]
    if write_layout_free is not None:
        writes.append((os.path.join(partial_dir, LAYOUT_FREE_DIRECTORY),
                       lambda: write_layout_free(partial_dir)))
    if args.expert_model_parallel_size > 1:
        writes.append((partial_dir, lambda: save_local_experts(engine.module, partial_dir,
                                                               args.num_experts)))
    if _rank() == 0:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "tag": tag_for(state.iteration),
            "train_state": dataclasses.asdict(state),
            "model": checkpoint_shape(args),
            "world_size": args.world_size,
            "data_parallel_size": args.data_parallel_size,
            "args": jsonable_args(args),
            "tokenizer": tokenizer,
        }
        if schedule is not None:
            meta[SCHEDULER_STATE_KEY] = schedule.state_dict()
        meta_path = os.path.join(partial_dir, META_FILE)  # last: it marks the files complete
        writes.append((meta_path, lambda: atomic_write_text(meta_path, json.dumps(meta, indent=1))))
    for path, write in writes:
        try:
            write()
        except _write_errors() as error:
            return _failure_text(path, error)
    return None


def _agree(failure: Optional[str]) -> Optional[str]:
    """Collective: the first rank's failure, on every rank (None if no rank failed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((f for f in failures if f is not None), None)


# Load ---------------------------------------------------------------------------------------------
def read_latest(load_dir: str, step: Optional[int] = None) -> Tuple[str, dict]:
    """(tag, metadata) of the newest complete checkpoint under load_dir (``step``: of that
    iteration's, as --ckpt-step)."""
    tag = resolve_load_tag(load_dir, step)
    meta_path = os.path.join(load_dir, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag} has no {META_FILE}; it was "
                              "not written by this trainer or is incomplete")
    with open(meta_path) as handle:
        try:
            meta = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{meta_path} is not valid JSON (truncated or damaged); "
                                  + other_checkpoint_hint(load_dir, _iteration_of(tag))) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {CHECKPOINT_FORMAT} file")
    return tag, meta


def _iteration_of(tag: str) -> Optional[int]:
    digits = tag.split("_", 1)[-1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def check_model_shape(meta: dict, args, adding_side_path: bool = False) -> None:
    saved, current = meta.get("model", {}), checkpoint_shape(args)
    for field in SHAPE_FIELDS:
        if field == "moe_type" and adding_side_path:
            continue
        # (a field the variant does not read: not recorded now, any value recorded before)
        if field in saved and field in current and saved[field] != current[field]:
            if field == "moe_type" and saved[field] == "moe" and \
                    current[field] in SIDE_PATH_VARIANTS:
                raise CheckpointError(f"checkpoint is a moe model and the flags give "
                                      f"--moe-type {current[field]}: add --finetune to start one "
                                      "from it (its side path is added with a zero output), or "
                                      "pass --moe-type moe")
            if field == "padded_vocab_size":  # TP is part of Megatron's vocabulary padding
                raise CheckpointError(vocab_padding_message(meta, args))
            flag = "--" + field.replace("_", "-")
            fix = (("add " if saved[field] else "drop ") + flag) \
                if isinstance(saved[field], bool) else f"pass {flag} {saved[field]}"
            raise CheckpointError(f"checkpoint has {field}={saved[field]!r} but the flags give "
                                  f"{current[field]!r}: {fix} or load another checkpoint")


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
    tag, meta = read_latest(args.load, getattr(args, "ckpt_step", None))
    adding_side_path = side_path_added(meta, args)
    check_model_shape(meta, args, adding_side_path)
    load_optimizer = not (args.finetune or args.no_load_optim)
    if load_optimizer:
        check_optimizer_groups(meta, args)
    directory = os.path.join(args.load, tag)
    try:
        if adding_side_path:
            _load_adding_side_path(engine, args, meta, directory)
        elif needs_reshard(meta, args, directory, load_optimizer):  # another layout
            restore_layout_free(engine, directory, load_optimizer)
        else:
            _load_same_layout(engine, args, tag, load_optimizer)
        if not args.finetune and not args.no_load_rng and rng_carries_over(meta, args):
            load_rng_state(directory)
    except CheckpointError as error:  # a damaged, missing or refused file: say what else loads
        raise CheckpointError(f"{error}; "
                              f"{other_checkpoint_hint(args.load, _iteration_of(tag))}") from None
    if args.finetune:
        return TrainState()
    state = TrainState(**meta["train_state"])
    if load_optimizer and schedule is not None:
        if SCHEDULER_STATE_KEY in meta:
            schedule.load_state_dict(meta[SCHEDULER_STATE_KEY])
        else:  # written before the scheduler was saved
            schedule.resume_without_state(state.consumed_train_samples)
    return state


def side_path_added(meta: dict, args) -> bool:
    """Whether this load upcycles an MoE checkpoint into HyperMoE or the static-adapter variant
    (``--finetune --moe-type hypermoe`` on a ``moe`` checkpoint): the paper's setting."""
    return (args.finetune and meta.get("model", {}).get("moe_type") == "moe"
            and args.moe_type in SIDE_PATH_VARIANTS)


def _load_adding_side_path(engine, args, meta: dict, directory: str) -> None:
    """The MoE's weights by global name (any layout), and a new side path whose output starts
    at zero (model/initialization.py ``zero_side_path_output_``): at step 0 the model computes
    what the MoE computed."""
    if not has_layout_free_files(directory):
        raise CheckpointError(f"checkpoint {directory} predates layout-free files, which adding "
                              "a side path reads: resume it as --moe-type moe and save again")
    print_rank0(f"adding a {args.moe_type} side path to the moe checkpoint (its output starts "
                 "at zero: the model computes what the MoE computed)")
    zero_side_path_output_(engine.module)
    restore_layout_free(engine, directory, load_optimizer=False, kept=is_side_path_parameter)


def _load_same_layout(engine, args, tag: str, load_optimizer: bool) -> None:
    """DeepSpeed's own files (and our expert files), in the layout that wrote them."""
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
