"""Run pretrain_gpt_hypermoe.main on several flag lists in this one process and write which
parsed flags (argparse dests) no run ever read.

    python tests/workers/read_flags.py OUT.json RUNS.json
RUNS.json: a list of argv lists. Reads while argparse fills the namespace do not count; reads by
finalize_args and the DeepSpeed config (the boundary's validation) do, and so do, below the
boundary, reads of the config field a flag sets (the trainer, checkpoints, the model: a model
flag counts once the model config is built from it). Recording the config (a checkpoint's
``args``, W&B's config) is not a read. The test
(tests/test_megatron_flags.py) fails on any flag in OUT.json: a flag that is parsed and never
read is a flag a user sets for nothing.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_gpt_hypermoe  # noqa: E402
from megatron_hypermoe.cli import arguments  # noqa: E402
from megatron_hypermoe.training import config as run_config  # noqa: E402


class ReadRecorder(argparse.Namespace):
    """A namespace whose attribute reads are collected in ``READ`` once it is in ``RECORDING``
    (kept outside the instance: vars(args) is written into checkpoints)."""

    READ = set()
    RECORDING = set()

    def __getattribute__(self, name):
        if not name.startswith("_") and id(self) in ReadRecorder.RECORDING:
            ReadRecorder.READ.add(name)
        return object.__getattribute__(self, name)


READ_FIELDS = set()  # (section, field) read below the boundary
CONSUMED = set()  # flags the model config was built from
PAUSED = []


def recording_section(cls, section):
    """``cls`` whose field reads are collected in READ_FIELDS."""
    class Recording(cls):
        def __getattribute__(self, name):
            if not name.startswith("_") and not PAUSED:
                READ_FIELDS.add((section, name))
            return object.__getattribute__(self, name)

    Recording.__name__ = Recording.__qualname__ = cls.__name__
    return Recording


class RecordingFlags(dict):
    def __getitem__(self, key):
        CONSUMED.add(key)
        return super().__getitem__(key)


def record_config_reads():
    run_config.SECTIONS = {section: recording_section(cls, section)
                           for section, cls in run_config.SECTIONS.items()}
    to_flags = run_config.RunConfig.to_flags

    def unrecorded_to_flags(self):
        PAUSED.append(True)
        try:
            return to_flags(self)
        finally:
            PAUSED.pop()

    run_config.RunConfig.to_flags = unrecorded_to_flags

    def recording_run_config(args):
        return run_config.RunConfig.from_flags(
            RecordingFlags(vars(args)), deepspeed_config=arguments.resolve_config(args))

    pretrain_gpt_hypermoe.run_config = recording_run_config


def read_through_configs() -> set:
    return {flag for flag, (section, field) in run_config.FLAG_FIELDS.items()
            if (section == "model" and flag in CONSUMED) or (section, field) in READ_FIELDS}


def main(out_path, runs_path):
    parser = arguments.build_parser()
    dests = {action.dest for action in parser._actions if action.dest != "help"}

    def recording_parse_args(argv=None, world_size=1):
        args = parser.parse_args(argv, namespace=ReadRecorder())
        ReadRecorder.RECORDING.add(id(args))
        arguments.finalize_args(args, world_size)
        return args

    pretrain_gpt_hypermoe.parse_args = recording_parse_args
    record_config_reads()
    for argv in json.loads(Path(runs_path).read_text()):
        code = pretrain_gpt_hypermoe.main(argv)
        assert code == 0, f"run {argv} exited {code}"
    unread = dests - ReadRecorder.READ - read_through_configs()
    Path(out_path).write_text(json.dumps(sorted(unread)))


if __name__ == "__main__":
    main(*sys.argv[1:])
