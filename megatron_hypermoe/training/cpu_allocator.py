"""On the CPU, keep freed gradient-sized buffers in the process for the next micro-batch.

glibc serves a block above a moving threshold (128 KB, rising with what is freed, at most 32 MB)
with a fresh mmap, and gives the heap's free top back to the OS past twice that threshold. A
training step frees and asks again for the same tens-of-MB gradient and activation buffers every
micro-batch, and each fresh one is page-faulted in again. What a step costs then depends on the
allocator's history: at GPT-2 width (benchmarks/bench_train.py) DeepSpeed's copy of one expert's
18.9 MB gradient took 6 ms in the MoE run and 50-78 ms in the HyperMoE run of the same process,
whose 25 MB hypernetwork-head gradients had moved the threshold. A GPU's caching allocator (and
jemalloc or tcmalloc) keeps such blocks. Fixing glibc's two thresholds (its documented
``mallopt`` tunables, the same as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_) does the
same here for blocks up to 32 MB.

Blocks above 32 MB (glibc's largest threshold) were still mmap-ed fresh every time, and a ZeRO
step asks for several GB of them at GPT-2 width (DeepSpeed's flattened gradients and partitions,
attention scores): 450-620 thousand page faults and 1.5-2.4 s of system time in a 3.3-4.3 s step
(benchmarks/bench_train.py, 2 threads), more for HyperMoE, and step ratios that swung 1.03-1.27
from run to run. So mmap is off as well (``M_MMAP_MAX`` 0: every block comes from the heap) and
the heap is never trimmed (mallopt(3): a trim threshold of -1): after the warm-up steps no page
faults, the GPT-2-width step 3.3 -> 1.9 s (top-1) and 4.4 -> 2.8 s (top-2). With trimming at
2 GB the top-2 step still faulted 0.5-1 GB every step. The process keeps its peak, as a GPU's
caching allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = -1  # never trim (mallopt(3): -1 disables trimming)


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False where the C library is not glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(option, value) for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_MMAP_MAX, 0)))


def benchmark_device():
    """(device, its name) for a one-process benchmark: megatron's parallel state set up, the GPU
    when there is one, else the CPU with the trainer's allocator settings (above)."""
    import platform

    import torch

    from megatron_hypermoe.parallel.distributed import initialize_distributed

    initialize_distributed(seed=0)
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name(0)
    keep_freed_memory()
    return torch.device("cpu"), platform.processor() or platform.machine()
