"""Fixtures shared across test files (what needs no pytest scope is in tests/support/)."""

import pytest
import torch

from tests.support.corpus import make_documents, write_jsonl


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
