#!/usr/bin/env python
"""Derive the CLIP tokenizer files shipped in ldm/assets/tokenizer/ from the BPE table.

The same program as `ldm make-tokenizer-assets`; the code is in ldm/cli/make_tokenizer_assets.py.
"""

import sys

from ldm.cli import run

if __name__ == "__main__":
    sys.exit(run("make_tokenizer_assets"))
