"""training/cpu_allocator.py: glibc's thresholds set for CPU training."""

import platform

import pytest

from megatron_hypermoe.training import cpu_allocator, setup


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_glibc_accepts_every_setting():
    # mallopt returns 0 for a value glibc refuses (e.g. an mmap threshold past its maximum)
    assert cpu_allocator.keep_freed_memory()


LARGE_BLOCK_FROM_THE_HEAP = """
import ctypes, sys, torch
from megatron_hypermoe.training.cpu_allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "set":
    keep_freed_memory()
before = libc.mallinfo2()
block = torch.ones(64 * 2**20 // 4)  # 64 MB, past glibc's largest mmap threshold
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
mmapped = during.hblkhd - before.hblkhd
kept = after.arena + after.hblkhd >= before.arena + 64 * 2**20
print(mmapped >= 64 * 2**20, kept)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_a_block_past_32_mb_comes_from_the_heap_and_stays():
    """Without the settings a 64 MB tensor is a fresh mmap, unmapped when freed; with them it
    comes from the heap and stays for the next step."""
    import subprocess
    import sys

    def run(mode):
        result = subprocess.run([sys.executable, "-c", LARGE_BLOCK_FROM_THE_HEAP, mode],
                                capture_output=True, text=True, check=True)
        return result.stdout.split()

    assert run("unset") == ["True", "False"]
    assert run("set") == ["False", "True"]


def test_the_trainer_sets_them_when_it_trains_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(setup, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    assert setup.training_device().type == "cpu"
    assert calls == [1]
