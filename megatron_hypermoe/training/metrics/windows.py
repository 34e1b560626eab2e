"""The trainer's logging windows: which iterations log where, and what each window averages.

Megatron writes TensorBoard/W&B scalars per --tensorboard-log-interval (the values since the
last such event) and a console line per --log-interval, whose timing and aux losses average over
the iterations since the last line, which may span several events.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple


class LogWindows:
    """Since the last logging event / the last console line: time, iterations, aux-loss sums."""

    def __init__(self, log_interval: int, tensorboard_log_interval: int, scalar_writers: bool):
        self.log_interval = log_interval
        self.tensorboard_log_interval = tensorboard_log_interval
        self.scalar_writers = scalar_writers
        self.event_time = self.console_time = time.time()
        self.iterations_since_event = self.iterations_since_console = 0
        self.console_aux_sums: Dict[str, float] = {}

    def due(self, iteration: int) -> Tuple[bool, bool]:
        """(a console line, a scalar-writer event) at the end of ``iteration``."""
        return (iteration % self.log_interval == 0,
                self.scalar_writers and iteration % self.tensorboard_log_interval == 0)

    def count_iteration(self) -> None:
        self.iterations_since_event += 1
        self.iterations_since_console += 1

    def take_event(self, now: float) -> Tuple[float, int]:
        """(seconds, iterations) since the last event; starts the next event window."""
        window = (now - self.event_time, self.iterations_since_event)
        self.event_time, self.iterations_since_event = now, 0
        return window

    def add_event_aux(self, aux: Dict[str, float], iterations: int) -> None:
        """An event's mean aux losses over its ``iterations``, for the console's average."""
        for name, value in aux.items():
            self.console_aux_sums[name] = self.console_aux_sums.get(name, 0.0) + value * iterations

    def take_console(self, now: float) -> Tuple[float, int, Dict[str, float]]:
        """(seconds, iterations, mean aux losses) since the last console line; starts the next
        console window."""
        iterations = self.iterations_since_console
        window = (now - self.console_time, iterations,
                  {name: total / iterations for name, total in self.console_aux_sums.items()})
        self.console_time, self.iterations_since_console, self.console_aux_sums = now, 0, {}
        return window
