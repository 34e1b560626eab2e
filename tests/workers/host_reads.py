"""Train a few iterations in this process and write, per iteration, where our package read a
tensor's value on the host (on a GPU each such read waits for every kernel queued before it).

    python tests/workers/host_reads.py OUT.json TRAINER_FLAGS...

OUT.json: {"iteration": ["file:line method", ...]}; iteration 0 is the setup. Reads by torch,
megatron-core and DeepSpeed are not counted (theirs to make), nor the trainer's reads of host
memory its stop vote filled behind the previous iteration (trainer.StopVote).
"""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import megatron_hypermoe  # noqa: E402
import pretrain_gpt_hypermoe  # noqa: E402
from megatron_hypermoe.training import trainer as trainer_module  # noqa: E402

PACKAGE = os.path.dirname(megatron_hypermoe.__file__) + os.sep
READS = defaultdict(list)
CURRENT = {"iteration": 0, "trainer": None}


def recorded(method, real):
    def read(tensor, *args, **kwargs):
        frame = sys._getframe(1)
        vote = getattr(getattr(CURRENT["trainer"], "stop_vote", None), "pending", None)
        if frame.f_code.co_filename.startswith(PACKAGE) and \
                not (vote is not None and tensor is vote[0]):
            where = f"{frame.f_code.co_filename[len(PACKAGE):]}:{frame.f_lineno} {method}"
            READS[CURRENT["iteration"]].append(where)
        return real(tensor, *args, **kwargs)
    return read


for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
    setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))

real_train_step = trainer_module.Trainer.train_step


def train_step(self, batches):
    CURRENT["trainer"] = self
    CURRENT["iteration"] = self.state.iteration + 1
    return real_train_step(self, batches)


trainer_module.Trainer.train_step = train_step

if __name__ == "__main__":
    code = pretrain_gpt_hypermoe.main(sys.argv[2:])
    Path(sys.argv[1]).write_text(json.dumps({str(k): v for k, v in sorted(READS.items())}))
    sys.exit(code)
