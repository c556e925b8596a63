"""Command lines: parse, validate, call the library, print. Nothing in the library imports them."""
import signal
import sys


def run_command(main) -> None:
    """Run one command line as a process and exit with its status.

    A Ctrl-C that escapes ``main`` gives one line and exit 130; one that lands while the interpreter tears down
    (torch's atexit hooks take a moment) is ignored, so the user never sees a traceback after the last line."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
