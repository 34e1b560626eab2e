"""What a run reports, in two halves: ``probes`` measures (router hooks counting each expert's
tokens, megatron's aux losses reduced over ranks, the HyperExpert's output RMS), ``writers``
sends the values where they go (a console line per --log-interval, TensorBoard and Weights &
Biases scalars under Megatron's names per --tensorboard-log-interval, JSON lines in
--metrics-file; rank 0 writes). Every logged value is named once, in ``writers.LOGGED``.
"""
