import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_single_process():
    """One-process gloo group and megatron parallel state (TP=1, EP=1), shared by the session."""
    from megatron_hypermoe.parallel import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()


RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")


def child_environment(**extra) -> dict:
    """os.environ for a child job: never inherit this process's distributed rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def run_torchrun(nproc: int, worker: str, *args: str, timeout: int = 120) -> str:
    """Run tests/workers/<worker> under torchrun with gloo; fail with its output if it fails."""
    from megatron_hypermoe.parallel import free_port

    env = child_environment()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(REPO_ROOT / "tests" / "workers" / worker), *args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{worker} failed (exit {result.returncode}):\n{output[-6000:]}"
    return output
