"""A stand-in GPU for the CPU suite: tensors that live on another device than the host.

On a CPU machine every tensor is on the CPU, so the bugs that only a GPU shows pass unseen: a
host tensor handed to an NCCL collective, a CPU generator sampling from CUDA logits, a module
left on the host while the rest of the model is on the GPU. Under :func:`emulated_accelerator`
the ``meta`` device plays the GPU: a tensor created there (or moved there) is a CPU tensor in a
wrapper that says ``device='meta'``, so the real arithmetic runs, and every op checks devices as
CUDA does:

- an op mixing accelerator tensors with host tensors fails ("Expected all tensors to be on the
  same device"), except host scalars (0-dim), which CUDA accepts too; copies across are fine;
- a random op on accelerator tensors with a CPU generator fails, as on CUDA;
- collectives take accelerator tensors only (NCCL: "No backend type associated with device type
  cpu"), and run them on the real (gloo) group.

megatron-core asks ``torch.cuda.current_device()`` where to build its layers and buffers; the
emulation answers ``meta``, as a GPU machine answers its GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")

# Ops that move data between devices (allowed to see both).
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default,
                 torch.ops.aten._copy_from.default, torch.ops.aten._copy_from_and_resize.default}


class AcceleratorTensor(torch.Tensor):
    """A host tensor (``inner``) presented as living on :data:`DEVICE`."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=DEVICE,
            requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return AcceleratorTensor(inner_tensors["inner"])

    def __repr__(self):
        return f"AcceleratorTensor({self.inner!r})"

    # megatron's make_viewless_tensor sets .data: the host tensor must follow
    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value):
        torch._C.TensorBase.data.__set__(self, value)
        self.inner = value.inner if isinstance(value, AcceleratorTensor) else value

    def tolist(self):  # (a host read: allowed on a GPU, it waits for the device)
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() "
                        "to copy the tensor to host memory first (the emulated accelerator)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with _Emulation():
            return func(*args, **(kwargs or {}))


def _on_accelerator(value) -> bool:
    return isinstance(value, AcceleratorTensor)


def _device_arg(value) -> bool:
    return value is not None and not isinstance(value, torch.Tensor) and \
        torch.device(value).type == DEVICE.type


class _Emulation(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = [*args, *kwargs.values()]
        flat = []
        for leaf in leaves:
            flat.extend(leaf if isinstance(leaf, (list, tuple)) else [leaf])
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_accelerator = any(_on_accelerator(t) for t in tensors)
        to_accelerator = _device_arg(kwargs.get("device"))
        if func not in _CROSS_DEVICE and on_accelerator:
            host = [t for t in tensors if not _on_accelerator(t) and t.dim() > 0]
            if host:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two "
                    f"devices, {DEVICE} (the emulated accelerator) and cpu! ({func})")
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != DEVICE.type:
                raise RuntimeError(f"Expected a '{DEVICE.type}' device type for generator but "
                                   f"found '{generator.device.type}' ({func})")
        if to_accelerator:
            kwargs["device"] = torch.device("cpu")
        unwrapped_args = tree_map(_unwrap, args)
        unwrapped_kwargs = tree_map(_unwrap, kwargs)
        out = func(*unwrapped_args, **unwrapped_kwargs)
        mutated = _mutated_argument(func, args, kwargs)
        if mutated is not None:
            return mutated
        if func in _CROSS_DEVICE and func is not torch.ops.aten._to_copy.default:
            return out
        if on_accelerator or to_accelerator:
            if func is torch.ops.aten._to_copy.default and not to_accelerator and \
                    "device" in kwargs:  # .to("cpu") / .cpu(): a plain host tensor
                return out
            return tree_map(_wrap, out)
        return out


def _unwrap(value):
    return value.inner if isinstance(value, AcceleratorTensor) else value


def _wrap(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, AcceleratorTensor):
        return AcceleratorTensor(value)
    return value


def _mutated_argument(func, args, kwargs):
    """The argument an in-place (or out=) op returns, so the caller gets its own tensor back."""
    schema = func._schema
    if not schema.returns or schema.returns[0].alias_info is None or \
            not schema.returns[0].alias_info.is_write:
        return None
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            if argument.kwarg_only or index >= len(args):
                return kwargs.get(argument.name)
            return args[index]
    return None


# Collectives --------------------------------------------------------------------------------------
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "all_to_all_single", "send", "recv", "isend", "irecv")


def _collective(name, real):
    @functools.wraps(real)
    def checked(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                    for t in a if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            if not _on_accelerator(tensor):
                raise RuntimeError(f"No backend type associated with device type "
                                   f"{tensor.device.type} (torch.distributed.{name} on the "
                                   "emulated accelerator: NCCL takes GPU tensors only)")
        return real(*tree_map(_unwrap, list(args)), **tree_map(_unwrap, kwargs))
    return checked


def _from_data(real):
    # torch.tensor(data, device=...) moves its data with the dispatcher's Python keys off, so the
    # emulation would only see a data-less meta tensor: build it on the host, then move it.
    @functools.wraps(real)
    def create(data, *args, device=None, **kwargs):
        if _device_arg(device):
            return real(data, *args, **kwargs).to(DEVICE)
        return real(data, *args, device=device, **kwargs)
    return create


@contextlib.contextmanager
def emulated_accelerator(monkeypatch):
    """Inside: ``torch.cuda.current_device()`` is the emulated accelerator, ops and
    collectives check devices as on a GPU with NCCL."""
    for name in _COLLECTIVES:
        monkeypatch.setattr(dist, name, _collective(name, getattr(dist, name)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: DEVICE)
    # megatron-core's scratch buffers (attention scores) are kept per process: fresh ones here
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    monkeypatch.setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", GlobalMemoryBuffer())
    # and so is its aux-loss tracker, whose host tensors earlier tests left behind
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(moe_utils, "_MOE_LAYER_WISE_LOGGING_TRACKER", {})
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, _from_data(getattr(torch, name)))
    # backward on this thread: autograd runs another device's backward on a thread of its own,
    # which would not see the emulation's factory functions
    with torch.autograd.set_multithreading_enabled(False), _Emulation():
        yield DEVICE


def devices_of(module: torch.nn.Module) -> set:
    """Every device a module's parameters and buffers are on."""
    return {t.device for t in (*module.parameters(), *module.buffers())}
