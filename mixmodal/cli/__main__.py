"""`python -m mixmodal.cli ...` = the `mixmodal` command (as `python -m mixmodal`)."""

import sys

from mixmodal.cli import main

sys.exit(main())
