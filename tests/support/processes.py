"""Running the trainer, tools and torchrun workers as a user would, in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

from megatron_hypermoe.parallel.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")


def child_environment(**extra) -> dict:
    """os.environ for a child job: never inherit this process's distributed rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def environment():
    """The trainer's child environment on this CPU machine."""
    return child_environment(DS_ACCELERATOR="cpu")


def run_torchrun(nproc: int, worker: str, *args: str, timeout: int = 120) -> str:
    """Run tests/workers/<worker> under torchrun with gloo; fail with its output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(REPO_ROOT / "tests" / "workers" / worker), *args,
    ]
    result = subprocess.run(cmd, env=child_environment(), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{worker} failed (exit {result.returncode}):\n{output[-6000:]}"
    return output


def pretrain_command(nproc):
    if nproc == 1:
        return [sys.executable, str(REPO_ROOT / "pretrain_gpt_hypermoe.py")]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(REPO_ROOT / "pretrain_gpt_hypermoe.py")]


def pretrain(*flags, nproc=1, timeout=240, expect=0, env=None):
    """Run the trainer (``env``: extra environment variables); return its output, or fail with
    the lines that explain the exit code."""
    result = subprocess.run(pretrain_command(nproc) + list(flags),
                            env={**environment(), **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != expect:
        clues = [line for line in output.splitlines()
                 if any(w in line for w in ("Error", "error:", "terminate", "Abort", "what()"))]
        raise AssertionError(f"exit {result.returncode}; clues:\n" + "\n".join(clues[:40])
                             + f"\n---- tail ----\n{output[-4000:]}")
    return output


def run_tool(tool, *flags, expect=0):
    """Run tools/<tool> as a user would; fail with its output on another exit code."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / tool), *map(str, flags)],
                            env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == expect, (result.stdout + result.stderr)[-3000:]
    return result


def error_line(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]
