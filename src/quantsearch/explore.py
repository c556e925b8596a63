"""``python -m quantsearch.explore``: the command line lives in :mod:`quantsearch.cli.explore`."""
import sys

from .cli.explore import main

if __name__ == "__main__":
    sys.exit(main())
