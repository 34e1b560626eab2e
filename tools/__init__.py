"""Megatron-style command-line entry points (``python tools/<name>.py --help``). Each ``main``
parses flags, calls the library in ``megatron_hypermoe`` and reports a user error as one line."""
