"""Run pretrain_gpt_hypermoe.main on several flag lists in this one process and write which
parsed flags (argparse dests) no run ever read.

    python tests/workers/read_flags.py OUT.json RUNS.json
RUNS.json: a list of argv lists. Reads while argparse fills the namespace do not count; reads by
finalize_args (validation), the trainer, checkpoints and the model do. The test
(tests/test_megatron_flags.py) fails on any flag in OUT.json: a flag that is parsed and never
read is a flag a user sets for nothing.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_gpt_hypermoe  # noqa: E402
from megatron_hypermoe.training import arguments  # noqa: E402


class ReadRecorder(argparse.Namespace):
    """A namespace whose attribute reads are collected in ``READ`` once it is in ``RECORDING``
    (kept outside the instance: vars(args) is written into checkpoints)."""

    READ = set()
    RECORDING = set()

    def __getattribute__(self, name):
        if not name.startswith("_") and id(self) in ReadRecorder.RECORDING:
            ReadRecorder.READ.add(name)
        return object.__getattribute__(self, name)


def main(out_path, runs_path):
    parser = arguments.build_parser()
    dests = {action.dest for action in parser._actions if action.dest != "help"}

    def recording_parse_args(argv=None, world_size=1):
        args = parser.parse_args(argv, namespace=ReadRecorder())
        ReadRecorder.RECORDING.add(id(args))
        arguments.finalize_args(args, world_size)
        return args

    pretrain_gpt_hypermoe.parse_args = recording_parse_args
    for argv in json.loads(Path(runs_path).read_text()):
        code = pretrain_gpt_hypermoe.main(argv)
        assert code == 0, f"run {argv} exited {code}"
    Path(out_path).write_text(json.dumps(sorted(dests - ReadRecorder.READ)))


if __name__ == "__main__":
    main(*sys.argv[1:])
