#!/usr/bin/env python
"""Join indexed-dataset shards into one (Megatron-LM's tools/merge_datasets.py).

    python tools/merge_datasets.py --input shards/ --output-prefix merged
"""

import argparse
import sys

from megatron_hypermoe.data.merge import merge
from megatron_hypermoe.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="a directory of shards, or shard prefixes (PREFIX.bin/.idx)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    count = merge(args.input, args.output_prefix, args.overwrite)
    print(f"merged {count} shards into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
