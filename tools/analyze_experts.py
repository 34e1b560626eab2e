#!/usr/bin/env python
"""Command-line entry; see megatron_hypermoe/analysis.py (--help for flags)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_hypermoe.analysis import main  # noqa: E402

sys.exit(main())
