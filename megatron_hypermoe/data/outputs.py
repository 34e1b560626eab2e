"""Checks every data tool makes before writing: never clobber silently, never half-create."""

import os
from typing import Sequence

from megatron_hypermoe.errors import DataError


def check_output_paths(paths: Sequence[str], overwrite: bool, prefix: str, flag: str) -> None:
    """Refuse existing outputs unless overwrite; require the output directory to exist."""
    existing = [path for path in paths if os.path.exists(path)]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists; pass --overwrite to replace it or "
                        f"choose another {flag}")
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        raise DataError(f"output directory {directory} does not exist; create it first")
