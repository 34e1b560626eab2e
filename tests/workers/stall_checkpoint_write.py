"""Run the trainer in this process, stalling in the middle of one checkpoint write, so that a
test can ``kill -9`` it there deterministically.

    python tests/workers/stall_checkpoint_write.py MARKER ITERATION TRAINER_FLAGS...

When the save of ITERATION has written DeepSpeed's files into ``iter_N.partial/`` and not yet
the RNG states and metadata, the worker writes MARKER and sleeps; the test waits for MARKER.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_gpt_hypermoe  # noqa: E402
from megatron_hypermoe.training import checkpointing  # noqa: E402


def main(marker, iteration, *argv):
    stall_in = checkpointing.tag_for(int(iteration)) + checkpointing.PARTIAL
    save_rng_state = checkpointing.save_rng_state

    def stalling_save_rng_state(directory):
        if os.path.basename(directory) == stall_in:
            Path(marker).write_text(directory)
            time.sleep(600)  # killed here
        save_rng_state(directory)

    checkpointing.save_rng_state = stalling_save_rng_state
    return pretrain_gpt_hypermoe.main(list(argv))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
