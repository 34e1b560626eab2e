"""Activation memory as autograd sees it: the bytes a forward saves for backward, parameters
excluded, counted once per storage with saved-tensor hooks (exact, and the same on CPU and GPU).
Used by the benchmarks and by the recomputation tests."""

from __future__ import annotations

import contextlib

import torch


class SavedActivationBytes:
    """Bytes of non-parameter tensors autograd keeps for backward, counted once per storage."""

    def __init__(self, parameters):
        self.param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.param_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self):
        return sum(self.storages.values())

    @contextlib.contextmanager
    def counting(self):
        """Count what the forwards inside this block save (a backward after it adds nothing)."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self
