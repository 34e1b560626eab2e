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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny tokenized corpus and the training flags that read it (shared by the training,
    conversion and comparison tests; one per test module)."""
    from megatron_hypermoe.data import preprocess, train_tokenizer
    from tests.test_data_pipeline import make_documents, write_jsonl

    root = tmp_path_factory.mktemp("train_data")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(300, seed=5))
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "400",
                                 "--model-prefix", str(root / "sp")]) == 0
    assert preprocess.main(["--input", corpus, "--output-prefix", str(root / "ds"),
                            "--tokenizer-type", "SentencePieceTokenizer",
                            "--tokenizer-model", str(root / "sp.model"), "--append-eod"]) == 0
    return ["--data-path", str(root / "ds_text_document"), "--split", "90,10,0",
            "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(root / "sp.model"),
            "--data-cache-path", str(root / "cache")]
