#!/usr/bin/env python
"""Score a shapes model: generate a fixed set of prompts, judge every image by its pixels.

The same program as `ldm eval-shapes`; the code is in ldm/cli/eval_shapes.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("eval_shapes"))
