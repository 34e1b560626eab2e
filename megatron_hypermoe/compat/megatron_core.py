"""The narrow patches megatron-core 0.16.1 needs here: five for CPU-only machines, two everywhere.

megatron-core assumes CUDA in places that a CPU-only model touches. Patches 1, 2, 4, 6 and 7 are
the narrowest changes that make those places work on the CPU; :func:`apply_cpu_patches` applies
them only when CUDA is unavailable. Patches 3 and 5 are needed on GPUs too (3 on any machine without
Transformer Engine: a GPU run without it failed in the router with a NameError; 5 because
megatron's local spec uses the torch norm for RMSNorm, with or without CUDA), so
:func:`apply_patches` applies them on every machine.
The patches are written against megatron-core 0.16.1 exactly and refuse any other version, since
they replace private functions.

1. ``torch.cuda.current_device()`` is used as a *device* for new tensors (global memory buffer,
   router, tensor-parallel layers, mappings): return ``torch.device("cpu")``.
2. The model-parallel RNG tracker stores CUDA generator states: keep CPU generator states.
3. ``moe_utils`` refers to ``te_general_gemm``, defined only with Transformer Engine: define None.
4. The all-to-all dispatcher creates a CUDA stream and copies split sizes device-to-host on it:
   skip the stream, turn the split tensors into numpy arrays.
5. MoE with tensor parallelism needs sequence parallelism, which the torch norm wrapper refuses:
   allow it and mark the norm's parameters ``sequence_parallel`` like megatron's other norms, so
   their gradients get the tensor-parallel all-reduce (``parallel/sequence_parallel.py``).
6. gloo cannot ``all_gather`` tensors of different sizes (``_gather_along_first_dim`` with split
   sizes, used with expert tensor parallelism): pad to the largest, gather, trim.
7. The pipeline schedules count tokens in ``torch.zeros([], device="cuda")``: the schedules
   module sees a ``torch`` whose ``zeros`` puts a "cuda" tensor on the CPU (nothing else
   changes, for that module or any other).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatron_hypermoe.compat import require_version

SUPPORTED_MEGATRON_CORE_VERSION = "0.16.1"

_applied = False
_norm_patched = False


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def cpu_patches_applied() -> bool:
    return _applied


def _check_version() -> None:
    require_version("megatron-core", megatron_core_version(), SUPPORTED_MEGATRON_CORE_VERSION,
                    "megatron-core patches")


def apply_patches() -> None:
    """Patches 3 and 5 on every machine, the CPU patches when there is no CUDA. Idempotent."""
    global _norm_patched
    if not _norm_patched:
        _check_version()
        _patch_torch_norm_sequence_parallel()
        _norm_patched = True
    _patch_te_general_gemm()
    apply_cpu_patches()


def apply_cpu_patches() -> bool:
    """Apply the CPU patches once. Returns True if they are (now) applied, False with CUDA."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False
    _check_version()
    _patch_current_device()
    _patch_rng_tracker()
    _patch_alltoall_dispatcher()
    _patch_uneven_all_gather()
    _patch_schedule_token_counter()
    _applied = True
    return True


def _cpu_current_device():
    return torch.device("cpu")


def _patch_current_device():
    torch.cuda.current_device = _cpu_current_device


# 2 ------------------------------------------------------------------------------------------------
def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """The same named, seeded streams as megatron's tracker, kept as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    # initialize_rng_tracker looks the class up by this module-level name.
    mp_random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class()
    mp_random.initialize_rng_tracker(force_reset=True)


# 3 ------------------------------------------------------------------------------------------------
def _patch_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    # Only the failed Transformer Engine import leaves the name undefined; with TE it is kept.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# 4 ------------------------------------------------------------------------------------------------
def _to_numpy_if_tensor(value):
    return value.numpy() if torch.is_tensor(value) else value


def _cpu_maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    # Same bookkeeping as the CUDA version, minus the side stream and the event.
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _to_numpy_if_tensor(self.input_splits)
        self.output_splits = _to_numpy_if_tensor(self.output_splits)
        self.output_splits_tp = _to_numpy_if_tensor(self.output_splits_tp)
    return tokens_per_expert


def _patch_alltoall_dispatcher():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # __init__ creates the shared stream only while this class attribute is None.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu: no stream"
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _cpu_maybe_dtoh_and_synchronize


# 5 ------------------------------------------------------------------------------------------------
def _patch_torch_norm_sequence_parallel():
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_hypermoe_patch", False):
        return

    @functools.wraps(original_new)
    def new_allowing_sequence_parallel(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        # Build with sequence_parallel hidden from the assertion, then restore it.
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True  # as megatron's FusedLayerNorm marks its own
        return norm

    new_allowing_sequence_parallel._hypermoe_patch = True
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new_allowing_sequence_parallel)


# 6 ------------------------------------------------------------------------------------------------
def _gather_uneven_along_first_dim(input_, group, output_split_sizes):
    """All-gather first-dim slices of different sizes with same-size collectives (gloo)."""
    largest = max(output_split_sizes)
    padded = input_.new_zeros((largest,) + tuple(input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((largest * len(output_split_sizes),) + tuple(input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    slices = [gathered[i * largest : i * largest + n] for i, n in enumerate(output_split_sizes)]
    return torch.cat(slices, dim=0)


def _patch_uneven_all_gather():
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim
    if getattr(original, "_hypermoe_cpu_patch", False):
        return

    @functools.wraps(original)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        return _gather_uneven_along_first_dim(input_, group, list(output_split_sizes))

    gather_along_first_dim._hypermoe_cpu_patch = True
    mappings._gather_along_first_dim = gather_along_first_dim


# Import-time noise ------------------------------------------------------------------------------
# megatron-core 0.16.1 warns once per module, at import, that Transformer Engine / Apex are
# missing (six warnings, before --help is even printed), and once per TransformerConfig that its
# own default cuda_graph_scope "full" is deprecated. None of them is actionable here: the local
# implementations are what this project runs. Exactly these messages are silenced;
# :func:`missing_accelerators` gives the one line that replaces them.
QUIET_MESSAGES = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.",
)
OPTIONAL_ACCELERATORS = {"transformer_engine": "Transformer Engine", "apex": "Apex",
                         "grouped_gemm": "grouped_gemm"}


def installed_megatron_core_version():
    """The installed megatron-core's version, without importing it (None if absent)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def quiet_import_warnings() -> bool:
    """Silence :data:`QUIET_MESSAGES` (before megatron-core is imported). Another megatron-core
    version keeps every warning: its messages may mean something else. True if installed."""
    import warnings

    if installed_megatron_core_version() != SUPPORTED_MEGATRON_CORE_VERSION:
        return False
    for message in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    return True


def missing_accelerators() -> list:
    """The optional accelerator packages megatron-core would use that are not installed."""
    from importlib.util import find_spec

    return [name for module, name in OPTIONAL_ACCELERATORS.items() if find_spec(module) is None]


def accelerator_summary():
    """One line about the missing optional accelerators, or None when all are installed."""
    missing = missing_accelerators()
    if not missing:
        return None
    return (f"optional accelerators not installed: {', '.join(missing)} (megatron-core runs "
            "its PyTorch implementations)")


class _TorchZerosOnCpu:
    """``torch`` as megatron's schedules module sees it after patch 7."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device")) == "cuda":
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _patch_schedule_token_counter():
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchZerosOnCpu()
