"""`globe` console script: builds the parser from the subcommand modules and turns GlobeError into one line."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from globe.errors import GlobeError

log = logging.getLogger("globe")

# Each module defines `register(subparsers)` adding its parser with `set_defaults(func=run)`.
SUBCOMMANDS = ("info", "calibrate", "fit", "export", "eval")
LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="globe",
        description="GloBE: compress the routed experts of MoE LLMs with global sparse basis banks.",
    )
    parser.add_argument("--log-level", default="INFO", choices=LEVELS,
                        help="logging verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"globe.cli.{name}").register(sub)
    for sp in sub.choices.values():  # also accept --log-level after the subcommand
        sp.add_argument("--log-level", default=argparse.SUPPRESS, choices=LEVELS, help="logging verbosity")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except GlobeError as exc:
        print(f"globe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"globe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
