#!/usr/bin/env python
"""Print docs/coming-from-megatron.md's table of Megatron-LM / Megatron-DeepSpeed flags: what
each does here (same, fixed by the architecture, refused and why), from
megatron_hypermoe/cli/megatron_flags.py.

    python tools/megatron_flag_table.py
"""

import sys

from megatron_hypermoe.cli.arguments import build_parser
from megatron_hypermoe.cli.megatron_flags import markdown_table
from megatron_hypermoe.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(markdown_table(build_parser()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
