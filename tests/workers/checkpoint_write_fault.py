"""Run the trainer in this process with a fault in its checkpoint writes, for the fault tests.

    python tests/workers/checkpoint_write_fault.py stall MARKER ITERATION TRAINER_FLAGS...
        When the save of ITERATION has written DeepSpeed's files into ``iter_N.partial/`` and
        not yet the RNG states and metadata, write MARKER and sleep (the test kills it -9).
    torchrun ... tests/workers/checkpoint_write_fault.py fail RANK TRAINER_FLAGS...
        On global rank RANK only, writing a ZeRO optimizer file fails as on a full disk.
"""

import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pretrain_gpt_hypermoe  # noqa: E402
from megatron_hypermoe.training.checkpoint import files, save_load  # noqa: E402


def stall(marker, iteration):
    stall_in = files.tag_for(int(iteration)) + files.PARTIAL
    save_rng_state = save_load.save_rng_state  # the name save_load calls

    def stalling_save_rng_state(directory):
        if os.path.basename(directory) == stall_in:
            Path(marker).write_text(directory)
            time.sleep(600)  # killed here
        save_rng_state(directory)

    save_load.save_rng_state = stalling_save_rng_state


def fail(rank):
    if os.environ["RANK"] != rank:
        return
    save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "optim_states" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)

    torch.save = failing_save


def main(mode, *argv):
    if mode == "stall":
        stall(*argv[:2])
        argv = argv[2:]
    else:
        fail(argv[0])
        argv = argv[1:]
    return pretrain_gpt_hypermoe.main(list(argv))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
