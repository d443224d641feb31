#!/usr/bin/env python
"""Package a trained model as the embedded demo model (ldm/assets/demo/ldm-shapes-demo.safetensors).

The same program as `ldm package-demo`; the code is in ldm/cli/package_demo.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("package_demo"))
