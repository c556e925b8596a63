"""``python -m quantsearch.calibrate --output FILE``: calibrate the run's quantizers and write a calibration file.

It takes the settings of ``python -m quantsearch.explore`` (the same ``--config`` file and flags, search settings
ignored) so that the file fits that run: ``explore --calibration FILE`` then reuses it and checks its fingerprints.
"""
from __future__ import annotations

import logging
import sys

from ..run.settings import ConfigError
from . import run_command
from .explore import build_parser, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m quantsearch.calibrate"
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--output", required=True, metavar="FILE", help="the calibration file to write (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if config.calibration:
            raise ConfigError("--calibration reads a calibration file; calibrate writes one with --output")
        from ..run.session import build_session

        calibration = build_session(config).calibration
        path = calibration.save(args.output)
    except ValueError as exc:  # every error a user can fix (ConfigError, ModelError, DataError, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unsigned = [n for n, flag in calibration.unsigned.items() if flag]
    methods = sorted(set(calibration.methods.values()))
    integer = f" and {len(calibration.integer)} integer operators" if calibration.integer else ""
    print(f"Calibrated {len(calibration.quantizers)} quantizers{integer} ({', '.join(methods)}; bits "
          f"{calibration.bits[0]}:{calibration.bits[1]}; {len(unsigned)} unsigned) on "
          f"{calibration.settings['samples']} images; wrote {path}")
    return 0


if __name__ == "__main__":
    run_command(main)
