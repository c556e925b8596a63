"""``python -m quantsearch.apply``: the command line lives in :mod:`quantsearch.cli.apply`."""
import sys

from .cli.apply import main

if __name__ == "__main__":
    sys.exit(main())
