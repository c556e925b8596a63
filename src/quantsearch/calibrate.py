"""``python -m quantsearch.calibrate``: the command line lives in :mod:`quantsearch.cli.calibrate`."""
import sys

from .cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
