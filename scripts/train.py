#!/usr/bin/env python
"""Fine-tune or train a latent diffusion model (U-Net, LoRA, from scratch) or its VAE.

The same program as `ldm train`; the code is in ldm/cli/train.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("train"))
