"""pretrain_gpt_hypermoe.py under torchrun with ONE mutation: the shared hypernetwork's
gradient is not summed over the pipeline stages (each stage steps its replica with its own
layers' gradient). tests/test_pipeline_parallel.py checks that the PP equivalence test would
catch this; the arguments are the trainer's flags."""

import sys
from pathlib import Path

from megatron_hypermoe.training import trainer

REPO_ROOT = Path(__file__).resolve().parents[2]


def main():
    trainer.allreduce_shared_grads = lambda model: None  # the mutation
    sys.path.insert(0, str(REPO_ROOT))
    import pretrain_gpt_hypermoe

    return pretrain_gpt_hypermoe.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
