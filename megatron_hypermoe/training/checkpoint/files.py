"""Checkpoint directories under --save: which ones count, how a new one is published, which old
ones are kept, and which one --load takes. File-system only (rank 0 calls the writers); what a
checkpoint holds is ``save_load.py``; the metadata file is read here (``read_latest``).

A checkpoint is COMPLETE when its directory is named ``iter_NNNNNNN`` and holds the metadata
file: directories only get that name by a rename after every rank has written everything. Other
names are the writer's:

- ``iter_N.partial``: being written, or left by a crash (``kill -9``, a full disk). Never loaded;
  the next save removes every one.
- ``iter_N.old``: while iteration N is saved again (a run resumed from N that saves N), a
  hard-linked copy of the old N that ``latest`` names while N is replaced, so ``latest`` never
  names a missing directory. Removed once ``latest`` names N again.
- ``iter_N.removing``: an old checkpoint being deleted by ``--save-retain`` (renamed first, so a
  half-deleted one is never taken for complete).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron_hypermoe.errors import CheckpointError

META_FILE = "hypermoe_checkpoint.json"
CHECKPOINT_FORMAT = "megatron-hypermoe-checkpoint"
CHECKPOINT_VERSION = 1
LATEST_FILE = "latest"
MEGATRON_LATEST_FILE = "latest_checkpointed_iteration.txt"
PARTIAL, OLD, REMOVING = ".partial", ".old", ".removing"
TEMPORARY = ".tmp-"  # atomic_write_text's file before its rename
_COMPLETE_NAME = re.compile(r"iter_(\d{7})")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# Reading -----------------------------------------------------------------------------------------
def read_latest_tag(directory: str) -> Optional[str]:
    path = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return handle.read().strip()


def complete_iterations(directory: str) -> List[int]:
    """Iterations of the complete checkpoints under ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _COMPLETE_NAME.fullmatch(name)
        if match and os.path.isfile(os.path.join(directory, name, META_FILE)):
            found.append(int(match.group(1)))
    return sorted(found)


def other_checkpoint_hint(directory: str, unusable_iteration: Optional[int]) -> str:
    """How to load another checkpoint than the unusable one: the newest complete one before it
    (any complete one if its iteration is unknown)."""
    others = [i for i in complete_iterations(directory) if i != unusable_iteration]
    earlier = [i for i in others if unusable_iteration is None or i < unusable_iteration]
    choice = (earlier or others or [None])[-1]
    if choice is None:
        return f"{directory} has no other complete checkpoint"
    return f"pass --ckpt-step {choice} to load the checkpoint of iteration {choice} instead"


# Writing (rank 0) --------------------------------------------------------------------------------
def atomic_write_text(path: str, text: str) -> None:
    temporary = f"{path}{TEMPORARY}{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _set_latest(directory: str, tag: str) -> None:
    atomic_write_text(os.path.join(directory, LATEST_FILE), tag)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def remove_leftovers(directory: str) -> None:
    """Remove what interrupted saves and deletions left: every ``.partial`` and ``.removing``,
    every ``.old`` that ``latest`` does not name, half-written copies of the ``latest`` files.
    Rank 0, before a save."""
    if not os.path.isdir(directory):
        return
    latest = read_latest_tag(directory)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("iter_") and (name.endswith((PARTIAL, REMOVING)) or
                                         (name.endswith(OLD) and name != latest)):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith((LATEST_FILE + TEMPORARY, MEGATRON_LATEST_FILE + TEMPORARY)):
            os.remove(path)


def _remove(directory: str, tag: str) -> None:
    """Rename, then delete: a half-deleted checkpoint never keeps a complete one's name."""
    doomed = os.path.join(directory, tag + REMOVING)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(os.path.join(directory, tag), doomed)
    shutil.rmtree(doomed)


def publish(directory: str, tag: str, iteration: int) -> None:
    """Rank 0, once every rank has written ``<tag>.partial``: rename it to ``<tag>`` and point
    ``latest`` at it. At every moment ``latest`` names a complete checkpoint, also when ``<tag>``
    exists already and is the one ``latest`` names: then ``latest`` names a hard-linked copy
    (``<tag>.old``) while ``<tag>`` is replaced."""
    old_tag = tag + OLD
    if os.path.isdir(os.path.join(directory, tag)):
        if read_latest_tag(directory) == tag:
            old_dir = os.path.join(directory, old_tag)
            shutil.rmtree(old_dir, ignore_errors=True)
            shutil.copytree(os.path.join(directory, tag), old_dir,
                            copy_function=_link_or_copy)
            _set_latest(directory, old_tag)
        _remove(directory, tag)
    os.replace(os.path.join(directory, tag + PARTIAL), os.path.join(directory, tag))
    _set_latest(directory, tag)
    atomic_write_text(os.path.join(directory, MEGATRON_LATEST_FILE), str(iteration))
    shutil.rmtree(os.path.join(directory, old_tag), ignore_errors=True)


def retain_newest(directory: str, keep: int) -> List[int]:
    """Delete complete checkpoints beyond the newest ``keep``, never the one ``latest`` names;
    returns the deleted iterations. Rank 0, after :func:`publish`."""
    latest = read_latest_tag(directory)
    deleted = [i for i in complete_iterations(directory)[:-keep] if tag_for(i) != latest]
    for iteration in deleted:
        _remove(directory, tag_for(iteration))
    return deleted


def resolve_load_tag(load_dir: str, step: Optional[int]) -> str:
    """The tag --load takes: --ckpt-step's iteration, else the one ``latest`` names; a
    CheckpointError naming the problem and another checkpoint to load if it is not complete."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir} does not exist")
    if step is not None:
        tag = tag_for(step)
        if not os.path.isfile(os.path.join(load_dir, tag, META_FILE)):
            available = complete_iterations(load_dir)
            raise CheckpointError(f"--ckpt-step {step}: {load_dir} has no complete checkpoint "
                                  f"{tag}; complete ones: "
                                  f"{', '.join(map(str, available)) or 'none'}")
        return tag
    tag = read_latest_tag(load_dir)
    if tag is None:
        raise CheckpointError(f"--load {load_dir} is not a checkpoint directory (no "
                              f"'{LATEST_FILE}' file); point it at a --save directory")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        match = _COMPLETE_NAME.match(tag)
        raise CheckpointError(f"--load {load_dir}: '{LATEST_FILE}' names {tag!r}, which does not "
                              "exist (deleted, or not copied with the rest); "
                              + other_checkpoint_hint(load_dir,
                                                      int(match.group(1)) if match else None))
    return tag


def read_latest(load_dir: str, step: Optional[int] = None) -> Tuple[str, dict]:
    """(tag, metadata) of the newest complete checkpoint under load_dir (``step``: of that
    iteration's, as --ckpt-step)."""
    tag = resolve_load_tag(load_dir, step)
    meta_path = os.path.join(load_dir, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag} has no {META_FILE}; it was "
                              "not written by this trainer or is incomplete")
    with open(meta_path) as handle:
        try:
            meta = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{meta_path} is not valid JSON (truncated or damaged); "
                                  + other_checkpoint_hint(load_dir, iteration_of(tag))) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {CHECKPOINT_FORMAT} file")
    return tag, meta


def iteration_of(tag: str) -> Optional[int]:
    digits = tag.split("_", 1)[-1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def latest_iteration(load_dir: Optional[str]) -> Optional[int]:
    """The newest complete checkpoint's iteration, or None if load_dir has none (yet)."""
    if not load_dir or not os.path.isfile(os.path.join(load_dir, LATEST_FILE)):
        return None
    _, meta = read_latest(load_dir)
    return meta["train_state"]["iteration"]
