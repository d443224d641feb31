#!/usr/bin/env python
"""Training speed on this machine: samples/s of a small model, with and without latent caching.

The same program as `ldm bench-train`; the code is in ldm/cli/bench_train.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("bench_train"))
