"""Every use of DeepSpeed 0.19.8's private API, version-checked.

DeepSpeed's public API has no way to (a) register expert-parallel process groups that someone
else created, (b) have its engine treat a MoE layer class other than its own as MoE, or (c) load
its checkpoint files without unpickling arbitrary objects, or (d) skip building a comm op it
does not need, or (e) give Adam's state to a ZeRO optimizer that has not stepped yet, or (f)
build its bf16 optimizer without printing a memory report, or (g) reduce gradients that a
backward outside its engine produced. Each is done here, against 0.19.8
exactly: any other version is refused with a message saying which to install.

a. :func:`register_expert_groups`: DeepSpeed reduces expert gradients over the groups it keeps
   in ``deepspeed.utils.groups._EXPERT_PARALLEL_GROUP`` / ``_EXPERT_DATA_PARALLEL_GROUP`` under
   a group name; we put megatron-core's groups there.
b. :func:`engine_treats_as_moe`: ``deepspeed.runtime.engine`` decides whether the model has MoE
   layers by ``isinstance(module, MoE)`` against its module-level name ``MoE``; while the engine
   is built, that name also covers megatron-core's ``MoELayer``.
c. :func:`install_weights_only_checkpoint_engine`: the engine's ``checkpoint_engine`` attribute
   is replaced by a subclass of DeepSpeed's torch engine that loads with ``weights_only=True``,
   allowing only DeepSpeed's plain record classes (loss scalers, ZeRO stage enum, fragment
   address), so a tampered file cannot run code; a truncated or damaged file is named as such.
   :func:`deferring_write_errors` swaps in one whose ``save`` records a failed write (a full
   disk) instead of raising, so every rank still passes DeepSpeed's collectives and all ranks
   can stop together.
d. :func:`skip_unused_shm_comm_op`: DeepSpeed's torch comm backend JIT-compiles a shared-memory
   all-reduce op whenever its CPU accelerator is active (~45 s on a first run, silently), though
   only ``inference_all_reduce`` (AutoTP inference) uses it; training collectives go through
   gloo. ``deepspeed.comm.torch.build_shm_op`` returns None on the CPU accelerator instead, which
   DeepSpeed already handles (it then falls back to torch.distributed).
e. :func:`optimizer_step_count` / :func:`create_optimizer_state`: the base optimizer (torch's
   AdamW, or DeepSpeedCPUAdam with offload) creates Adam's state lazily at its first step, and
   ZeRO links each parameter's fragment of it (where ``safe_set_full_optimizer_state`` writes)
   only after that step, in ``_lazy_init_hp_params_optimizer_state``. A layout-free resume sets
   the state before the first step: it creates the state zeroed at the saved step, in the form
   the base optimizer would (torch: a float tensor step; CPUAdam: an int), and links it there.
   :func:`link_optimizer_state` works around a DeepSpeed 0.19.8 bug: ZeRO links the fragments
   of EVERY group right after the FIRST group's first step, when the later groups have no state
   yet, and never again; their parameters then have no ``exp_avg`` for
   ``safe_get_full_optimizer_state``. It links them again once every group has stepped.
f. :func:`quiet_bf16_optimizer_memory_report`: ``BF16_Optimizer.__init__`` (ZeRO-1 with bf16)
   calls ``see_memory_usage(..., force=True)`` around every group, which prints two dozen lines
   of memory figures with ``print`` on rank 0 of every bf16 run. Its module-level name
   ``see_memory_usage`` drops the forced calls instead (an explicit DeepSpeed
   ``memory_breakdown`` still prints through other callers).
g. :func:`reduce_gradients_after_external_backward`: under pipeline parallelism megatron-core's
   schedule runs every backward pass (``torch.autograd.backward`` on the stage's output), not
   ``engine.backward``; the ZeRO-1 gradients are then reduced as DeepSpeed's own PipelineEngine
   reduces them after its schedule: ``reduce_gradients(pipeline_parallel=True)`` (which
   allocates the buckets a skipped ``engine.backward`` would have), or, for the bf16 optimizer,
   the step's bf16 gradients folded into the fp32 ones once and ``buffered_allreduce_fallback``
   (its ``immediate_grad_update`` folding, tried instead, did not reproduce one process's
   gradient norm under the schedule).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_hypermoe.compat import require_version
from megatron_hypermoe.errors import CheckpointError

SUPPORTED_DEEPSPEED_VERSION = "0.19.8"


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def check_deepspeed_version() -> None:
    require_version("deepspeed", deepspeed_version(), SUPPORTED_DEEPSPEED_VERSION,
                    "DeepSpeed glue")


# a ------------------------------------------------------------------------------------------------
def register_expert_groups(group_name: str, expert_parallel_group,
                           expert_data_parallel_group) -> None:
    """Make DeepSpeed reduce the experts tagged ``param.group_name = group_name`` over these."""
    check_deepspeed_version()
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[group_name] = expert_parallel_group
    groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = expert_data_parallel_group


# b ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def engine_treats_as_moe(layer_class):
    """While DeepSpeed builds its engine, instances of ``layer_class`` count as MoE layers."""
    check_deepspeed_version()
    import deepspeed.runtime.engine as engine_module

    original = engine_module.MoE
    engine_module.MoE = (original, layer_class)
    try:
        yield
    finally:
        engine_module.MoE = original


# c ------------------------------------------------------------------------------------------------
def deepspeed_record_classes():
    """The only non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str, map_location=None):
    """torch.load of one of DeepSpeed's .pt files with weights_only=True; a missing file or one
    that holds anything but tensors and DeepSpeed's records is a CheckpointError."""
    try:
        with torch.serialization.safe_globals(deepspeed_record_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError.missing_file(path) from None
    except Exception as error:
        reason = str(error).strip().splitlines()
        unsupported = [line for line in reason if "Unsupported global" in line]
        if not unsupported:  # not a refused class: the bytes themselves are bad
            raise CheckpointError.damaged_file(path, error) from None
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors "
                              f"and DeepSpeed's plain records ({unsupported[0].strip()[:160]})"
                              ) from None


def install_weights_only_checkpoint_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_deepspeed_file`."""
    check_deepspeed_version()
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_deepspeed_file(path, map_location)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)



@contextlib.contextmanager
def deferring_write_errors(engine):
    """While ``engine.save_checkpoint`` runs: a file DeepSpeed fails to write (OSError, or
    torch's RuntimeError from its zip writer; also its copy of the zero_to_fp32.py scripts) is
    recorded as (path, error), and no later file of this rank is written; yields the list.
    DeepSpeed's collectives (tag check, barriers) still run on every rank, so the caller can
    agree on the failure with the other ranks instead of leaving them waiting."""
    check_deepspeed_version()
    original = engine.checkpoint_engine
    failures = []

    class RecordingCheckpointEngine(type(original)):
        def __init__(self):  # shares the original's state (config, name)
            self.__dict__.update(original.__dict__)

        def save(self, state_dict, path: str):
            if failures:
                return
            try:
                super().save(state_dict, path)
            except (OSError, RuntimeError) as error:
                failures.append((path, error))

    def copy_recovery_scripts(save_dir):  # rank 0 copies zero_to_fp32.py at every save
        if not failures:
            try:
                copy_scripts(save_dir)
            except OSError as error:
                failures.append((save_dir, error))

    copy_scripts = engine._copy_recovery_script
    engine.checkpoint_engine = RecordingCheckpointEngine()
    engine._copy_recovery_script = copy_recovery_scripts
    try:
        yield failures
    finally:
        engine.checkpoint_engine = original
        del engine._copy_recovery_script  # the class's method again

# d ------------------------------------------------------------------------------------------------
def skip_unused_shm_comm_op() -> None:
    """On DeepSpeed's CPU accelerator, never build the shared-memory comm op (see d). Call
    before ``deepspeed.initialize``. Idempotent."""
    check_deepspeed_version()
    import importlib

    from deepspeed.accelerator import get_accelerator

    # (``import deepspeed.comm.torch as m`` would bind the package's ``torch`` attribute instead)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    original = ds_comm_torch.build_shm_op
    if getattr(original, "_hypermoe_patch", False) or get_accelerator().device_name() != "cpu":
        return

    def build_shm_op():
        return None

    build_shm_op._hypermoe_patch = True
    ds_comm_torch.build_shm_op = build_shm_op


# f ------------------------------------------------------------------------------------------------
def quiet_bf16_optimizer_memory_report() -> None:
    """Make BF16_Optimizer's forced memory prints no-ops (see f). Idempotent."""
    check_deepspeed_version()
    from deepspeed.runtime import bf16_optimizer

    original = bf16_optimizer.see_memory_usage
    if getattr(original, "_hypermoe_patch", False):
        return

    def see_memory_usage(message, force=False):
        if not force:
            original(message, force)

    see_memory_usage._hypermoe_patch = True
    bf16_optimizer.see_memory_usage = see_memory_usage


# e ------------------------------------------------------------------------------------------------
def _flat_partitions(zero_optimizer):
    """The base optimizer's parameters: ZeRO's flat fp32 partitions, one per group."""
    return [flat for group in zero_optimizer.optimizer.param_groups for flat in group["params"]]


def optimizer_step_count(zero_optimizer) -> int:
    """Adam's step of a ZeRO 1/2 optimizer (every partition steps together); 0 before the first
    step."""
    check_deepspeed_version()
    state = zero_optimizer.optimizer.state
    steps = {int(state[flat]["step"]) for flat in _flat_partitions(zero_optimizer)
             if "step" in state.get(flat, {})}
    if len(steps) > 1:
        raise CheckpointError(f"the optimizer's parameter groups are at different steps {steps}")
    return steps.pop() if steps else 0


def create_optimizer_state(zero_optimizer, step: int) -> None:
    """Give a ZeRO 1/2 optimizer that has not stepped Adam's state at ``step`` (moments zero) and
    link every parameter's fragment to it, so that DeepSpeed's safe_set_full_optimizer_state can
    fill it."""
    check_deepspeed_version()
    base = zero_optimizer.optimizer
    for flat in _flat_partitions(zero_optimizer):
        state = base.state[flat]
        if state:
            raise CheckpointError("the optimizer has stepped already; set its state before "
                                  "the first step")
        # torch's Adam and AdamW keep the step as a tensor (AdamW is no Adam subclass in older
        # torch: 2.6 for one); DeepSpeed's CPUAdam as an int
        torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
        state["step"] = torch.tensor(float(step)) if torch_adam else int(step)
        state["exp_avg"] = torch.zeros_like(flat)
        state["exp_avg_sq"] = torch.zeros_like(flat)
    link_optimizer_state(zero_optimizer)


def link_optimizer_state(zero_optimizer) -> None:
    """Point every parameter's fragment at its group's current Adam state (see e)."""
    check_deepspeed_version()
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def reduce_gradients_after_external_backward(engine) -> None:
    """(g) Reduce over the data-parallel ranks the gradients accumulated in the module by
    backward passes run outside ``engine.backward`` (ZeRO stage 1), before ``engine.step()``."""
    check_deepspeed_version()
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, BF16_Optimizer):
        optimizer.update_hp_grads(clear_lp_grads=True)
        engine.buffered_allreduce_fallback(grads=None)
        return
    optimizer.reduce_gradients(pipeline_parallel=True)
