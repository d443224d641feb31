#!/usr/bin/env python
"""Run ldm and diffusers on the same weights and inputs; print differences and timings.

The same program as `ldm compare`; the code is in ldm/cli/compare_diffusers.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("compare_diffusers"))
