"""`python -m bank` runs the `bank` command line."""

import sys

from bank.cli import main

sys.exit(main())
