"""Parallel layouts: process groups and megatron-core's parallel state, where each weight is
split over tensor-parallel ranks, expert naming by global id, the tensor-parallel gradient sum of
sequence-parallel weights, and the glue that lets DeepSpeed train megatron-core's experts."""
