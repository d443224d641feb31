#!/usr/bin/env python
"""Benchmark ldm against diffusers on the same weights: speed, memory, achieved FLOP/s.

The same program as `ldm benchmark`; the code is in ldm/cli/benchmark.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("benchmark"))
