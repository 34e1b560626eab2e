"""Errors a user can fix, and how every command-line tool reports them.

A :class:`UserError` carries a one-line message that names the problem and the fix. Every
``main()`` (``pretrain_gpt_hypermoe.py`` and ``tools/*.py``) is wrapped in
:func:`exit_on_user_error`, which prints ``error: <message>`` on stderr and returns exit code 1
instead of a traceback. Anything else is a bug and keeps its traceback.

The subclasses only say where the problem was found; callers that do not care catch
``UserError``.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the problem and the fix."""


class ArgumentError(UserError):
    """Inconsistent or unsupported command-line flags."""


class ConfigError(UserError):
    """A model configuration value that cannot work."""


class DataError(UserError):
    """Unreadable or inconsistent input data, tokenizer or output paths."""


class CheckpointError(UserError):
    """A checkpoint or model directory that cannot be used."""

    @classmethod
    def damaged_file(cls, path: str, error: Exception) -> "CheckpointError":
        """A checkpoint file that exists but cannot be parsed (truncated or damaged)."""
        detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        return cls(f"checkpoint file {path} cannot be read, it is truncated or damaged "
                   f"({type(error).__name__}: {detail[:160]})")

    @classmethod
    def missing_file(cls, path: str) -> "CheckpointError":
        """A file the checkpoint should hold and does not (not copied, or deleted)."""
        return cls(f"checkpoint file {path} is missing; the checkpoint is incomplete")


class DeepSpeedConfigError(UserError):
    """A bad or contradictory DeepSpeed config."""


class PeerLost(UserError):
    """Another process of the job is gone (killed, crashed, its node down)."""


class TrainingStopped(UserError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


def exit_on_user_error(main):
    """Wrap a tool's ``main(argv) -> int``: a UserError becomes one line on stderr and exit 1."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1

    return run
