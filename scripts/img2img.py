#!/usr/bin/env python
"""Change an image: img2img, inpainting, outpainting; each PNG carries its generation parameters.

The same program as `ldm img2img`; the code is in ldm/cli/img2img.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("img2img"))
