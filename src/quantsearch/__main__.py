import sys

from .cli.explore import main

sys.exit(main())
