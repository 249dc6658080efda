"""``python -m mppool``: the command line (see ``mppool.cli``)."""

import sys

from .cli import main

# Guarded: the 'spawn' start method re-imports the main module in every child process.
if __name__ == "__main__":
    sys.exit(main())
