"""Layout-free training state: a checkpoint of one (TP, EP, DP, ZeRO 1/2) layout resumes in any
other valid layout of the same model, optimizer state included.

DeepSpeed's files hold each rank's flat ZeRO partitions of the layout that wrote them. Next to
them every checkpoint gets ``layout_free/``, tensors by GLOBAL parameter name (experts by global
id), read with DeepSpeed's public helpers ``safe_get_full_fp32_param`` and
``safe_get_full_optimizer_state``, which assemble a parameter from the ZeRO partitions of its
data-parallel group (for experts: the expert-data-parallel group)::

    layout_free/
        index.json                       the layout that wrote it, Adam's step, engine counters,
                                         the files below
        dense_tp_rank_00.safetensors     non-expert parameters as TP rank 0 holds them, the
                                         replicated ones, the module's buffers
        dense_tp_rank_01.safetensors     TP rank 1's shards of the tensor-parallel weights
        experts_ep_rank_00001_tp_rank_00.safetensors   EP rank 1's experts (expert-TP rank 0)

Keys: ``fp32/<name>`` (the fp32 master weight), ``exp_avg/<name>``, ``exp_avg_sq/<name>``
(Adam's moments), ``buffer/<name>``. Tensor-parallel shards stay per TP rank and are merged and
re-sliced at load by megatron's partition rules (``parallel/tensor_sharding.py``). Each tensor is
written by one rank: data-parallel rank 0 of each TP rank (expert-data-parallel rank 0 of each
EP x expert-TP rank for experts), TP rank 0 alone for replicated tensors.

Loading (:func:`restore_layout_free`) runs on the engine built for the new layout: each rank
gives each of its parameters the full value and moments of its new shard with
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (they write this rank's ZeRO
fragment, no collective, and leave the module's weight alone), then the optimizer's
``update_lp_params`` copies the fp32 masters into the module's weights and all-gathers them over
the data-parallel groups, as DeepSpeed does after its own universal-checkpoint load.

A missing or damaged file (index, or a file the index lists) stops the load with one line naming
it, as on the same-layout path (``CheckpointError.missing_file`` / ``damaged_file``).

Not carried across layouts: RNG states (they are per rank; :func:`rng_carries_over`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.compat.deepspeed import (
    create_optimizer_state,
    link_optimizer_state,
    optimizer_step_count,
)
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.parallel.distributed import print_rank0
from megatron_hypermoe.parallel.experts import (
    global_name_function,
    is_expert_parameter,
    tensor_parallel_size_and_rank,
)
from megatron_hypermoe.parallel.layout import ParallelLayout
from megatron_hypermoe.parallel.tensor_sharding import merge, partition_dim, shard
from megatron_hypermoe.training.checkpoint.experts import this_rank_expert_file_name
from megatron_hypermoe.training.config import RunConfig

DIRECTORY = "layout_free"
INDEX_FILE = "index.json"
FORMAT = "megatron-hypermoe-layout-free"
MOMENTS = ("exp_avg", "exp_avg_sq")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")

def checkpoint_layout(meta: dict) -> ParallelLayout:
    """The layout a checkpoint was written with (from hypermoe_checkpoint.json)."""
    recorded = meta.get("args", {})
    return ParallelLayout(tp=int(recorded.get("tensor_model_parallel_size", 1)),
                          ep=int(recorded.get("expert_model_parallel_size", 1)),
                          dp=int(meta.get("data_parallel_size", 1)),
                          zero=int(recorded.get("zero_stage", 1)),
                          pp=int(recorded.get("pipeline_model_parallel_size", 1)))


def dense_file_name(tp_rank: int) -> str:
    """(Under pipeline parallelism with the stage: ``dense_pp_rank_01_tp_rank_00``; every name
    ends with the TP rank, which the loader reads.)"""
    stage = ""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stage = f"pp_rank_{parallel_state.get_pipeline_model_parallel_rank():02d}_"
    return f"dense_{stage}tp_rank_{tp_rank:02d}.safetensors"


def has_layout_free_files(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, DIRECTORY, INDEX_FILE))


def rng_carries_over(meta: dict, current: ParallelLayout) -> bool:
    """Per-rank RNG states fit a run whose ranks have the same roles: same TP, EP and DP (a
    ZeRO stage change keeps them)."""
    saved = checkpoint_layout(meta)
    return (saved.tp, saved.ep, saved.dp, saved.pp) == (current.tp, current.ep, current.dp,
                                                        current.pp)


# Which path a load takes --------------------------------------------------------------------------
def needs_reshard(meta: dict, current: ParallelLayout, directory: str,
                  load_optimizer: bool) -> bool:
    """False: DeepSpeed's own files fit this run (same layout; or, without the optimizer, same TP
    and EP). True: the layout-free files must be used. Refuses what neither can load, in one
    line; says which path on rank 0."""
    saved = checkpoint_layout(meta)
    if saved == current:
        print_rank0(f"resuming with the same layout ({current.describe()})")
        return False
    if not has_layout_free_files(directory):
        if not load_optimizer and (saved.tp, saved.ep, saved.pp) == (current.tp, current.ep,
                                                                      current.pp):
            # DeepSpeed loads module weights into any DP size / ZeRO stage (today's path).
            print_rank0(f"loading weights only from {saved.describe()} into "
                        f"{current.describe()}")
            return False
        if os.path.isdir(os.path.join(directory, DIRECTORY)):  # copied without its index
            raise CheckpointError.missing_file(os.path.join(directory, DIRECTORY, INDEX_FILE))
        raise CheckpointError(
            f"checkpoint {directory} predates layout-free files, so it loads only in the layout "
            f"that wrote it ({saved.describe()}; this run: {current.describe()}): resume it "
            "there and save again")
    if current.zero not in (1, 2):
        raise CheckpointError(f"--zero-stage {current.zero}: a checkpoint of another layout "
                              f"({saved.describe()}) resumes under ZeRO stage 1 or 2 only")
    print_rank0(f"resharding from {saved.describe()} to {current.describe()}")
    if not rng_carries_over(meta, current):
        print_rank0("RNG states are per rank and do not carry over to another layout: dropout "
                    "and sampling continue from fresh streams of --seed")
    return True


def vocab_padding_message(meta: dict, run: RunConfig) -> str:
    """Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP, so a
    TP change can change the model's shape: name the divisor that gives the saved size."""
    saved = meta["model"]["padded_vocab_size"]
    tp = run.parallel.tp
    divisor = run.embedding.make_vocab_size_divisible_by
    problem = (f"checkpoint has padded_vocab_size={saved} but the flags give "
               f"{run.embedding.padded_vocab_size} (the vocabulary is padded to a multiple of "
               f"--make-vocab-size-divisible-by {divisor} x TP {tp})")
    recorded = meta.get("args", {})
    saved_multiple = int(recorded.get("make_vocab_size_divisible_by", 128)) * \
        int(recorded.get("tensor_model_parallel_size", 1))
    if saved_multiple % tp == 0:  # the saved run's multiple
        return f"{problem}: pass --make-vocab-size-divisible-by {saved_multiple // tp}"
    if saved % tp == 0:  # one multiple covering the whole padded vocabulary
        return f"{problem}: pass --make-vocab-size-divisible-by {saved // tp}"
    return f"{problem}: no divisor gives {saved} at TP {tp}; use a TP that divides {saved}"


# Save ---------------------------------------------------------------------------------------------
def _is_writer(expert: bool, dim: Optional[int]) -> bool:
    """One rank writes each tensor: data-parallel rank 0 (of the expert-data-parallel group for
    experts) of each TP rank, or of TP rank 0 for tensors every TP rank holds whole."""
    if expert:
        dp_rank = parallel_state.get_expert_data_parallel_rank()
        tp_rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        dp_rank = parallel_state.get_data_parallel_rank()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return dp_rank == 0 and (dim is not None or tp_rank == 0)


def _global_names(model):
    """(local name, global name, parameter) of every trained parameter."""
    to_global = global_name_function(model.config)
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name, to_global(name), param


def gather_layout_free(engine, layout: ParallelLayout) -> Optional[Callable[[str], None]]:
    """Assemble this rank's share of the layout-free state (collective: every rank takes part in
    assembling every one of its parameters over its data-parallel group) and return the write
    of it into ``directory/layout_free`` (local I/O only, so a rank whose disk fails cannot
    leave the others in a collective). ZeRO-3 runs write none: None."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    if layout.zero not in (1, 2):
        return None
    step = optimizer_step_count(engine.optimizer)
    if step > 0:
        link_optimizer_state(engine.optimizer)
    dense: Dict[str, torch.Tensor] = {}
    experts: Dict[str, torch.Tensor] = {}
    for name, global_name, param in _global_names(engine.module):
        if not hasattr(param, "_hp_mapping"):
            raise CheckpointError(f"{name} is not in the ZeRO optimizer: cannot save it "
                                  "layout-free")
        # Collective over the parameter's (expert-)data-parallel group: every rank calls.
        values = {"fp32": safe_get_full_fp32_param(param)}
        if step > 0:  # Adam's state exists from the first step on
            values.update({key: safe_get_full_optimizer_state(param, key) for key in MOMENTS})
        expert = is_expert_parameter(name)
        if _is_writer(expert, partition_dim(name)):
            target = experts if expert else dense
            for kind, value in values.items():
                target[f"{kind}/{global_name}"] = value.detach().cpu().contiguous()
    parameters = {name for name, _ in engine.module.named_parameters()}
    to_global = global_name_function(engine.module.config)
    if _is_writer(False, None):
        for name, tensor in engine.module.state_dict().items():
            if name not in parameters and torch.is_tensor(tensor) and \
                    not name.endswith("_extra_state"):
                dense[f"buffer/{to_global(name)}"] = tensor.detach().cpu().contiguous()
    _drop_earlier_stages_keys(dense)
    dense_name = dense_file_name(parallel_state.get_tensor_model_parallel_rank())
    expert_name = this_rank_expert_file_name()
    # The index lists every rank's files, so that a load names one that is missing.
    files = [None] * dist.get_world_size()
    dist.all_gather_object(files, [name for name, tensors in ((dense_name, dense),
                                                              (expert_name, experts)) if tensors])
    index = None
    if dist.get_rank() == 0:
        index = {"format": FORMAT, "version": 1,
                 "layout": layout.index_record(), "step": step,
                 "engine": {key: int(getattr(engine, key)) for key in ENGINE_COUNTERS},
                 "loss_scaler": _loss_scaler_state(engine.optimizer),
                 "files": sorted(set().union(*files))}

    def write(directory: str) -> None:
        out = os.path.join(directory, DIRECTORY)
        os.makedirs(out, exist_ok=True)
        if dense:
            save_file(dense, os.path.join(out, dense_name))
        if experts:
            save_file(experts, os.path.join(out, expert_name))
        if index is not None:
            with open(os.path.join(out, INDEX_FILE), "w") as handle:
                json.dump(index, handle, indent=1)
    return write


def _drop_earlier_stages_keys(tensors: Dict[str, torch.Tensor]) -> None:
    """Under pipeline parallelism, what several stages hold (the shared hypernetwork, the
    rotary tables) is written once, by the first stage that holds it (collective over the
    pipeline group)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    keys = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, sorted(tensors), group=group)
    earlier = set().union(*keys[:parallel_state.get_pipeline_model_parallel_rank()])
    for key in earlier & set(tensors):
        del tensors[key]


def save_layout_free(engine, layout: ParallelLayout, directory: str) -> None:
    """Gather and write in one call (collective)."""
    write = gather_layout_free(engine, layout)
    if write is not None:
        write(directory)


def _loss_scaler_state(optimizer) -> dict:
    """fp16's dynamic loss scale (plain numbers), so that a resharded run scales as before."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    return {key: value for key, value in vars(scaler).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


# Load ---------------------------------------------------------------------------------------------
# a layout-free file's name ends with its TP rank
_FILE_NAME = re.compile(r"\w+_tp_rank_(\d+)\.safetensors")


def _read_index(path: str) -> dict:
    """The parsed index, what a load reads from it checked first: a missing, truncated or
    damaged index is a CheckpointError naming it."""
    try:
        with open(path) as handle:
            index = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError.missing_file(path) from None
    except (OSError, ValueError) as error:  # not JSON (truncated), not UTF-8, unreadable
        raise CheckpointError.damaged_file(path, error) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} index")
    try:
        layout = ParallelLayout.from_index_record(index["layout"])
        int(index["step"])
        for value in [*index["engine"].values(), *index.get("loss_scaler", {}).values()]:
            float(value)
        for name in index.get("files", []):  # (older indexes do not list their files)
            match = _FILE_NAME.fullmatch(name)
            if match is None or int(match.group(1)) >= layout.tp:
                raise ValueError(f"'files' lists {name!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError.damaged_file(path, error) from None
    return index


class _Tensors:
    """Every ``layout_free`` file of a checkpoint, opened lazily; a tensor by (TP rank, key).
    A missing, truncated or damaged file is a CheckpointError naming it (one line)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = os.path.join(directory, DIRECTORY)
        self.index = _read_index(os.path.join(self.directory, INDEX_FILE))
        self.layout = ParallelLayout.from_index_record(self.index["layout"])
        self.by_tp_rank = [dict() for _ in range(self.layout.tp)]  # key -> (handle, path)
        self.handles = []
        file_names = self.index.get("files")
        if file_names is None:  # an index written before it listed its files
            file_names = sorted(name for name in os.listdir(self.directory)
                                if _FILE_NAME.fullmatch(name))
        for file_name in file_names:
            tp_rank = int(_FILE_NAME.fullmatch(file_name).group(1))
            path = os.path.join(self.directory, file_name)
            if not os.path.isfile(path):
                raise CheckpointError.missing_file(path)
            try:
                handle = safe_open(path, framework="pt")
                keys = list(handle.keys())
            except Exception as error:  # safetensors' own error class, or an OSError
                raise CheckpointError.damaged_file(path, error) from None
            self.handles.append(handle)
            for key in keys:
                if key in self.by_tp_rank[tp_rank]:
                    raise CheckpointError(f"{self.directory}: {key} is in two files of TP rank "
                                          f"{tp_rank}; the checkpoint is damaged")
                self.by_tp_rank[tp_rank][key] = (handle, path)

    def get(self, key: str, tp_rank: int = 0) -> torch.Tensor:
        entry = self.by_tp_rank[tp_rank].get(key)
        if entry is None:
            raise CheckpointError(f"{self.directory} lacks {key} (TP rank {tp_rank}): a "
                                  "layout-free file is missing; copy the whole checkpoint")
        handle, path = entry
        try:  # the data are read here, not at safe_open
            return handle.get_tensor(key)
        except Exception as error:  # safetensors' own error class, or an OSError
            raise CheckpointError.damaged_file(path, error) from None

    def full(self, kind: str, global_name: str, gated: bool) -> torch.Tensor:
        """The whole tensor, merged from the saved TP ranks' shards."""
        dim = partition_dim(global_name)
        ranks = range(self.layout.tp) if dim is not None else [0]
        return merge([self.get(f"{kind}/{global_name}", r) for r in ranks], global_name, dim,
                     gated)


def _local_shard(tensors: _Tensors, kind: str, name: str, global_name: str, param,
                 gated: bool) -> torch.Tensor:
    """This rank's slice, in the new layout, of the saved tensor ``kind/global_name``."""
    tp_size, tp_rank = tensor_parallel_size_and_rank(name)
    full = tensors.full(kind, global_name, gated)
    local = shard(full, name, partition_dim(name), tp_size, tp_rank, gated)
    if local.shape != param.shape:
        raise CheckpointError(f"{tensors.directory}: {global_name} has shape "
                              f"{tuple(full.shape)}, which does not give this run's shard "
                              f"{tuple(param.shape)}")
    return local.to(device=param.device, dtype=torch.float32)


@torch.no_grad()
def restore_layout_free(engine, directory: str, load_optimizer: bool,
                        kept=lambda name: False) -> None:
    """Give every parameter of this (freshly built) engine its saved fp32 master weight and, with
    ``load_optimizer``, Adam's moments and step (collective: ends with an all-gather). A
    parameter whose name ``kept`` accepts (one the checkpoint's model lacks) keeps the value it
    has in the module, made its master weight."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tensors = _Tensors(directory)
    model, optimizer = engine.module, engine.optimizer
    gated = bool(getattr(model.config, "gated_linear_unit", True))
    step = int(tensors.index["step"]) if load_optimizer else 0
    if step > 0:
        create_optimizer_state(optimizer, step)
    for name, global_name, param in _global_names(model):
        if not hasattr(param, "_hp_mapping"):
            raise CheckpointError(f"{name} is not in the ZeRO optimizer: a layout change "
                                  "needs ZeRO stage 1 or 2")
        # Each setter writes only this rank's fragment of the flat partition.
        if kept(name):  # (never tensor-parallel: the side path is replicated)
            safe_set_full_fp32_param(param, param.detach().float())
            continue
        safe_set_full_fp32_param(param, _local_shard(tensors, "fp32", name, global_name, param,
                                                     gated))
        for key in MOMENTS if step > 0 else ():
            safe_set_full_optimizer_state(
                param, _local_shard(tensors, key, name, global_name, param, gated), key)
    to_global = global_name_function(model.config)
    for name, buffer in model.named_buffers():
        key = f"buffer/{to_global(name)}"
        if key in tensors.by_tp_rank[0]:
            buffer.copy_(tensors.get(key))
    # The setters leave the module's weights alone: copy the masters there and all-gather.
    optimizer.update_lp_params()
    if load_optimizer:
        for key, value in tensors.index["engine"].items():
            setattr(engine, key, value)
        scaler = getattr(optimizer, "loss_scaler", None)
        for key, value in tensors.index.get("loss_scaler", {}).items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)
    del tensors
    dist.barrier()
