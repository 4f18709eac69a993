"""`python -m mixmodal ...` = the `mixmodal` command; what torchrun needs: `torchrun -m mixmodal train ...`."""

import sys

from mixmodal.cli import main

sys.exit(main())
