"""`python -m ldm COMMAND ...`: the same as the `ldm` console command."""

import sys

from ldm.cli import main

sys.exit(main())
