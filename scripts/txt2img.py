#!/usr/bin/env python
"""Generate images from a text prompt; each PNG carries its generation parameters.

The same program as `ldm txt2img`; the code is in ldm/cli/txt2img.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("txt2img"))
