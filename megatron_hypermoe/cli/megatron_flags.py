"""Megatron-LM and Megatron-DeepSpeed flags this trainer takes although it has no choice to make.

A Megatron user's launch script should run with only the entry point swapped. Every flag of the
scripts we mirror (``SOURCES`` in ``megatron_flag_tables.py``, with the tables) is one of:

- **same**: a flag of ours with Megatron's name and meaning (declared where its feature lives);
- **fixed**: the architecture already is what the flag asks for (RMSNorm, SwiGLU, RoPE, untied
  embeddings, no linear biases, megatron-core's local layers): accepted with that value,
  stopped with a one-line error for any other (``FIXED``);
- **refused**: a feature not offered here: any use stops the run with the reason
  (``REFUSED``).

``python tools/megatron_flag_table.py`` prints the table in docs/coming-from-megatron.md from
these declarations (a test keeps the two equal).
"""

from __future__ import annotations

import argparse

from megatron_hypermoe.cli.megatron_flag_tables import (
    FIXED,
    REFUSED,
    SAME_FLAG_REMARKS,
    SOURCES,
    SWITCH,
)
from megatron_hypermoe.errors import ArgumentError


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """The FIXED and REFUSED flags, so that a Megatron script parses; checked by
    :func:`check_megatron_flags`."""
    group = parser.add_argument_group(
        "Megatron-LM flags fixed by this architecture (accepted with the value shown)")
    for fixed in FIXED:
        if fixed.accepted is SWITCH:
            group.add_argument(fixed.flag, action="store_true", help=fixed.what_it_is)
        else:
            group.add_argument(fixed.flag, type=fixed.type, default=fixed.accepted,
                               help=f"only {fixed.accepted}: {fixed.what_it_is}")
    group = parser.add_argument_group(
        "Megatron-LM flags not offered here (any use stops the run, saying why)")
    for refused in REFUSED:
        if refused.nargs == SWITCH:
            group.add_argument(refused.flag, action="store_true", help=refused.why)
        else:
            group.add_argument(refused.flag, nargs=refused.nargs, default=None,
                               help=refused.why)


def check_megatron_flags(args) -> None:
    for fixed in FIXED:
        value = getattr(args, _dest(fixed.flag))
        if fixed.accepted is not SWITCH and value != fixed.accepted:
            raise ArgumentError(f"{fixed.flag} {value} is not supported: {fixed.what_it_is} "
                                f"(pass {fixed.accepted} or drop the flag)")
    for refused in REFUSED:
        value = getattr(args, _dest(refused.flag))
        if value not in (None, False):
            raise ArgumentError(f"{refused.flag} is not supported: {refused.why}")


# The table ----------------------------------------------------------------------------------------
def flag_table(parser: argparse.ArgumentParser):
    """[(flag, kind, note)] for every flag of every source, in first-seen order."""
    fixed = {f.flag: f for f in FIXED}
    refused = {r.flag: r for r in REFUSED}
    actions = {option: action for action in parser._actions for option in action.option_strings}
    rows, seen = [], set()
    for flags in SOURCES.values():
        for flag in flags:
            if flag in seen:
                continue
            seen.add(flag)
            if flag in fixed:
                what = fixed[flag]
                value = "" if what.accepted is SWITCH else f" {what.accepted}"
                rows.append((flag, f"fixed{value}", what.what_it_is))
            elif flag in refused:
                rows.append((flag, "refused", refused[flag].why))
            elif flag in actions:
                primary = actions[flag].option_strings[0]
                note = SAME_FLAG_REMARKS.get(flag, "")
                if primary != flag:
                    note = f"alias of {primary}" + (f"; {note}" if note else "")
                rows.append((flag, "same", note))
            else:
                rows.append((flag, "MISSING", ""))
    return rows


def markdown_table(parser: argparse.ArgumentParser) -> str:
    rows = flag_table(parser)
    counts = {kind: sum(1 for _, k, _ in rows if k.split()[0] == kind)
              for kind in ("same", "fixed", "refused")}
    lines = [f"{len(rows)} flags: {counts['same']} same, {counts['fixed']} fixed by the "
             f"architecture, {counts['refused']} refused.", "",
             "| Megatron flag | here | note |", "|---|---|---|"]
    lines += [f"| `{flag}` | {kind} | {note} |" for flag, kind, note in rows]
    return "\n".join(lines) + "\n"
