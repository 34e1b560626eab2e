"""The trainer's checkpoint API: ``save_checkpoint`` and ``load_checkpoint`` (collective), and
``TrainState``. How the files are laid out, and why writes are atomic and loads safe: the
package's docstring (``training/checkpoint/__init__.py``)."""


from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch.distributed as dist

from megatron_hypermoe.compat.deepspeed import (
    deferring_write_errors,
    install_weights_only_checkpoint_engine,
)
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.model.initialization import zero_side_path_output_
from megatron_hypermoe.model.side_path import is_side_path_parameter
from megatron_hypermoe.parallel.distributed import global_rank, print_rank0
from megatron_hypermoe.training.checkpoint.compatibility import (
    check_model_shape,
    check_optimizer_groups,
    checkpoint_shape,
    side_path_added,
)
from megatron_hypermoe.training.checkpoint.experts import (
    restore_local_experts,
    save_local_experts,
)
from megatron_hypermoe.training.checkpoint.files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST_FILE,
    META_FILE,
    PARTIAL,
    atomic_write_text,
    iteration_of,
    other_checkpoint_hint,
    publish,
    read_latest,
    read_latest_tag,
    remove_leftovers,
    retain_newest,
    tag_for,
)
from megatron_hypermoe.training.checkpoint.layout_free import DIRECTORY as LAYOUT_FREE_DIRECTORY
from megatron_hypermoe.training.checkpoint.layout_free import (
    gather_layout_free,
    has_layout_free_files,
    needs_reshard,
    restore_layout_free,
    rng_carries_over,
)
from megatron_hypermoe.training.checkpoint.rng import load_rng_state, rng_path, save_rng_state
from megatron_hypermoe.training.config import RunConfig
from megatron_hypermoe.training.lr_schedule import SCHEDULER_STATE_KEY


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# Save ---------------------------------------------------------------------------------------------
def save_checkpoint(engine, run: RunConfig, state: TrainState, tokenizer: Optional[dict] = None,
                    schedule=None) -> str:
    """Save on every rank (collective). Returns the final checkpoint directory. ``tokenizer``
    (its fingerprint: type, vocab size, file hashes) lets converters refuse a mismatched one;
    ``schedule`` (training/lr_schedule.py) is saved as Megatron saves its scheduler. A write
    that fails on any rank is a CheckpointError on every rank; nothing is published."""
    tag = tag_for(state.iteration)
    partial_dir = os.path.join(run.checkpoint.save, tag + PARTIAL)
    if global_rank() == 0:
        os.makedirs(run.checkpoint.save, exist_ok=True)
        # left by a crash (kill -9, full disk) during earlier saves
        remove_leftovers(run.checkpoint.save)
    _barrier()
    failure = _agree(_write_partial(engine, run, state, partial_dir, tokenizer, schedule))
    if failure is None and global_rank() == 0:
        try:
            publish(run.checkpoint.save, tag, state.iteration)
            if run.checkpoint.save_retain:
                retain_newest(run.checkpoint.save, run.checkpoint.save_retain)
        except OSError as error:
            failure = _failure_text(run.checkpoint.save, error)
    failure = _agree(failure)
    if failure is not None:
        if global_rank() == 0:
            shutil.rmtree(partial_dir, ignore_errors=True)  # give the space back
        latest = read_latest_tag(run.checkpoint.save)
        kept = f"'{LATEST_FILE}' still names {latest}" if latest else "no checkpoint is saved yet"
        raise CheckpointError(f"saving checkpoint {tag} failed: {failure}; {kept}: free space "
                              "(or raise the file-size limit) and resume")
    return os.path.join(run.checkpoint.save, tag)


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
    return f"rank {global_rank()} could not write {path} ({type(error).__name__}: {detail}{free})"


def _write_partial(engine, run, state, partial_dir, tokenizer, schedule) -> Optional[str]:
    """This rank's files into ``partial_dir``; the first failed write, described, or None."""
    with deferring_write_errors(engine) as failures:  # all ranks still pass DeepSpeed's barriers
        engine.save_checkpoint(run.checkpoint.save, tag=os.path.basename(partial_dir),
                               client_state={}, save_latest=False)
    # Collective, so before any return: a rank whose write failed still takes part.
    write_layout_free = gather_layout_free(engine, run.parallel)
    if failures:
        return _failure_text(*failures[0])
    writes = [(rng_path(partial_dir, global_rank()), lambda: save_rng_state(partial_dir))]
    if write_layout_free is not None:
        writes.append((os.path.join(partial_dir, LAYOUT_FREE_DIRECTORY),
                       lambda: write_layout_free(partial_dir)))
    if run.parallel.ep > 1:
        writes.append((partial_dir, lambda: save_local_experts(engine.module, partial_dir,
                                                               run.model.num_moe_experts)))
    if global_rank() == 0:
        flags = run.to_flags()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "tag": tag_for(state.iteration),
            "train_state": dataclasses.asdict(state),
            "model": checkpoint_shape(flags),
            "world_size": run.parallel.world_size,
            "data_parallel_size": run.parallel.dp,
            "args": flags,
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
def load_checkpoint(engine, run: RunConfig, schedule=None) -> TrainState:
    """Restore weights, optimizer, RNG, the train state and, with the optimizer, the
    learning-rate schedule (collective). As in Megatron, --finetune and --no-load-optim start
    the schedule afresh."""
    tag, meta = read_latest(run.checkpoint.load, run.checkpoint.ckpt_step)
    adding_side_path = side_path_added(meta, run)
    check_model_shape(meta, run, adding_side_path)
    load_optimizer = not (run.checkpoint.finetune or run.checkpoint.no_load_optim)
    if load_optimizer:
        check_optimizer_groups(meta, run)
    directory = os.path.join(run.checkpoint.load, tag)
    try:
        if adding_side_path:
            _load_adding_side_path(engine, run, meta, directory)
        elif needs_reshard(meta, run.parallel, directory, load_optimizer):  # another layout
            restore_layout_free(engine, directory, load_optimizer)
        else:
            _load_same_layout(engine, run, tag, load_optimizer)
        if not (run.checkpoint.finetune or run.checkpoint.no_load_rng) and \
                rng_carries_over(meta, run.parallel):
            load_rng_state(directory)
    except CheckpointError as error:  # a damaged, missing or refused file: say what else loads
        hint = other_checkpoint_hint(run.checkpoint.load, iteration_of(tag))
        raise CheckpointError(f"{error}; {hint}") from None
    if run.checkpoint.finetune:
        return TrainState()
    state = TrainState(**meta["train_state"])
    if load_optimizer and schedule is not None:
        if SCHEDULER_STATE_KEY in meta:
            schedule.load_state_dict(meta[SCHEDULER_STATE_KEY])
        else:  # written before the scheduler was saved
            schedule.resume_without_state(state.consumed_train_samples)
    return state


def _load_adding_side_path(engine, run, meta: dict, directory: str) -> None:
    """The MoE's weights by global name (any layout), and a new side path whose output starts
    at zero (model/initialization.py ``zero_side_path_output_``): at step 0 the model computes
    what the MoE computed."""
    if not has_layout_free_files(directory):
        raise CheckpointError(f"checkpoint {directory} predates layout-free files, which adding "
                              "a side path reads: resume it as --moe-type moe and save again")
    print_rank0(f"adding a {run.model.moe_type} side path to the moe checkpoint (its output "
                "starts at zero: the model computes what the MoE computed)")
    zero_side_path_output_(engine.module)
    restore_layout_free(engine, directory, load_optimizer=False, kept=is_side_path_parameter)


def _load_same_layout(engine, run, tag: str, load_optimizer: bool) -> None:
    """DeepSpeed's own files (and our expert files), in the layout that wrote them."""
    install_weights_only_checkpoint_engine(engine)
    path, _ = engine.load_checkpoint(run.checkpoint.load, tag=tag,
                                     load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=False,
                                     load_module_only=not load_optimizer)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint {tag} under {run.checkpoint.load}")
    if run.parallel.ep > 1:
        restore_local_experts(engine, os.path.join(run.checkpoint.load, tag),
                              run.model.num_moe_experts)


