"""Fixtures shared across test files (what needs no pytest scope is in tests/support/)."""

import fcntl
import os
import tempfile

import pytest
import torch

from tests.support.corpus import make_documents, write_jsonl

# `make test` runs the suite on two pytest-xdist workers. Tests that launch several processes
# (marked multiprocess) already use every core, and some time heartbeats: each holds this lock
# exclusively while the other worker waits; one-process tests share it and run two at a time.
# The lock covers a test's whole protocol, so module fixtures that launch ranks are inside it.
# The controller makes the lock file and hands it to the workers in the environment; each
# worker takes it out again, so no process a test starts (a nested pytest) waits on it.
TEST_LOCK_VARIABLE = "HYPERMOE_TEST_LOCK"


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        config.hypermoe_test_lock = os.environ.pop(TEST_LOCK_VARIABLE, None)
    elif config.getoption("numprocesses", None):
        handle, path = tempfile.mkstemp(prefix="hypermoe-tests-", suffix=".lock")
        os.close(handle)
        os.environ[TEST_LOCK_VARIABLE] = path  # the workers, started later, inherit it
        config.hypermoe_lock_file = path


def pytest_unconfigure(config):
    path = getattr(config, "hypermoe_lock_file", None)
    if path is not None:
        os.environ.pop(TEST_LOCK_VARIABLE, None)
        os.remove(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = getattr(item.config, "hypermoe_test_lock", None)
    if path is None:  # one process runs every test
        yield
        return
    with open(path, "a") as handle:
        exclusive = item.get_closest_marker("multiprocess") is not None
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # released when the file closes


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
    from megatron_hypermoe.parallel.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A tiny tokenized corpus and the training flags that read it (shared by the training,
    conversion and comparison tests; built once per session)."""
    from tools import preprocess_data, train_tokenizer

    root = tmp_path_factory.mktemp("train_data")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(300, seed=5))
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "400",
                                 "--model-prefix", str(root / "sp")]) == 0
    assert preprocess_data.main(["--input", corpus, "--output-prefix", str(root / "ds"),
                                 "--tokenizer-type", "SentencePieceTokenizer",
                                 "--tokenizer-model", str(root / "sp.model"),
                                 "--append-eod"]) == 0
    return ["--data-path", str(root / "ds_text_document"), "--split", "90,10,0",
            "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(root / "sp.model"),
            "--data-cache-path", str(root / "cache")]


@pytest.fixture
def corpus_file(dataset):
    """The jsonl the dataset fixture was made from."""
    return dataset[dataset.index("--data-path") + 1].replace("ds_text_document", "corpus.jsonl")
