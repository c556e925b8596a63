"""``python -m quantsearch.explore``: the command line lives in :mod:`quantsearch.cli.explore`."""
from .cli import run_command
from .cli.explore import main


def command() -> None:
    """The console script: ``main`` run as a process."""
    run_command(main)


if __name__ == "__main__":
    command()
