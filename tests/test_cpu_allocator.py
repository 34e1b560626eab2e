"""training/cpu_allocator.py: glibc's thresholds set for CPU training."""

import platform

import pytest

from megatron_hypermoe.training import cpu_allocator, setup


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_glibc_accepts_both_thresholds():
    # mallopt returns 0 for a value glibc refuses (e.g. an mmap threshold past its maximum)
    assert cpu_allocator.keep_freed_memory()


def test_the_trainer_sets_them_when_it_trains_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(setup, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    assert setup.training_device().type == "cpu"
    assert calls == [1]
