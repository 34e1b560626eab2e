"""A run's parallel layout, in one frozen value: how the world is split into tensor, pipeline,
expert and data-parallel ranks, and how ZeRO shards the optimizer state over the data-parallel
ones. ``parallel/distributed.py`` builds megatron-core's process groups from it, and a
layout-free checkpoint records it (``layout`` in its index: tp, ep, dp, zero, pp).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # --tensor-model-parallel-size
    ep: int = 1  # --expert-model-parallel-size (within the data-parallel ranks, as Megatron's)
    dp: int = 1  # world size / (TP x PP)
    zero: int = 1  # --zero-stage
    pp: int = 1  # --pipeline-model-parallel-size (last, for indexes written before PP)
    # how TP splits activations, not where parameters live: layouts that differ only in it are
    # the same for checkpoints
    sequence_parallel: bool = dataclasses.field(default=False, compare=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        stages = f" PP {self.pp}" if self.pp > 1 else ""
        return f"TP {self.tp} EP {self.ep}{stages} DP {self.dp} ZeRO {self.zero}"

    def index_record(self) -> dict:
        """What a layout-free checkpoint's index records (the sizes its files depend on)."""
        return {"tp": self.tp, "ep": self.ep, "dp": self.dp, "zero": self.zero, "pp": self.pp}

    @classmethod
    def from_index_record(cls, record: dict) -> "ParallelLayout":
        return cls(**{key: int(value) for key, value in record.items()})

    def single_process(self) -> "ParallelLayout":
        return ParallelLayout(zero=self.zero)
