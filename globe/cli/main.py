"""`globe` console script: builds the parser from the subcommand modules and turns GlobeError into one line.

    globe info [MODEL_DIR]                      inventory of a checkpoint
    globe compress [MODEL_DIR] -o OUT          fit + compressed checkpoint (+ dense, eval) + model card: the main job
    globe fit [MODEL_DIR] -o OUT                fit the banks (OUT/banks.safetensors, globe_config.json, metrics.jsonl)
    globe export OUT -o DIR [--dense]           compressed or dense checkpoint (`globe apply`: deprecated alias)
    globe eval [MODEL_DIR] [--globe OUT]        perplexity, speed, memory, cache hit rate; --plots DIR writes PNGs
    globe bench [MODEL_DIR] --globe OUT         original vs every runtime mode, one JSON
    globe sweep [MODEL_DIR] -o SWEEP.json       GloBE vs per-expert SVD at several budgets (for eval --sweep)

MODEL_DIR (and export's --model) may be a hub id `org/name`: it is downloaded where a network exists.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from safetensors import SafetensorError

from globe.cli.inputs import check_inputs, typed_flag
from globe.errors import GlobeError
from globe.io.hub import resolve_model_dir

log = logging.getLogger("globe")

# Each module defines `register(subparsers)` adding its parser with `set_defaults(func=run)`.
SUBCOMMANDS = ("info", "calibrate", "fit", "compress", "export", "eval", "bench", "sweep")
LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals (unknown option, invalid int, bad choice) as one line naming the option as typed."""

    argv: list[str] = []

    def error(self, message: str):
        options = frozenset(s for a in self._actions for s in a.option_strings)
        for action in self._actions:                      # "argument --m/--atoms: ..." -> the alias typed
            long = "/".join(action.option_strings)
            if action.option_strings and f"argument {long}:" in message:
                message = message.replace(f"argument {long}:", f"argument {typed_flag(action, self.argv, options)}:")
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="globe",
        description="GloBE: compress the routed experts of MoE LLMs with global sparse basis banks. "
                    "`globe COMMAND --help` explains every option of a command.",
        epilog="MODEL_DIR arguments take a local checkpoint directory or a Hugging Face hub id (org/name, "
               "downloaded where a network exists).",
    )
    parser.add_argument("--log-level", default="INFO", choices=LEVELS,
                        help="logging verbosity (default: INFO; WARNING and above also hide every progress bar)")
    parser.add_argument("--progress", action="store_true",
                        help="progress bars even when stderr is not a terminal (default: only on a terminal)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"globe.cli.{name}").register(sub)
    for sp in {id(sp): sp for sp in sub.choices.values()}.values():  # --log-level after the subcommand too
        sp.add_argument("--log-level", default=argparse.SUPPRESS, choices=LEVELS,
                        help="logging verbosity (default: INFO)")
        sp.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                        help="progress bars even when stderr is not a terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    OneLineParser.argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)          # the command line, for model cards
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    configure_progress(args.log_level, args.progress)
    hold = HoldUntilWork()
    for handler in logging.getLogger().handlers:
        handler.addFilter(hold)
    try:
        check_inputs(subparser(parser, args.command), args, args.argv)      # inputs before any work
        resolve_model_args(args)
        pick_device(args)
        return int(args.func(args) or 0)
    except GlobeError as exc:
        print(f"globe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"globe {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:                           # disk full, permission denied, ... while reading or writing
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"globe {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (SafetensorError, UnicodeDecodeError, OverflowError) as exc:   # from a file or value the user gave
        log.debug("traceback", exc_info=True)
        print(f"globe {args.command}: error: {type(exc).__name__}: {one_line(exc)} (a damaged file or an "
              "out-of-range value; rerun with --log-level DEBUG to see where)", file=sys.stderr)
        return 2
    except Exception as exc:                         # a bug: one line for the user, the traceback at DEBUG level
        log.debug("traceback", exc_info=True)
        print(f"globe {args.command}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --log-level DEBUG "
              "for the traceback and please report it)", file=sys.stderr)
        return 3


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def configure_progress(level: str, forced: bool) -> None:
    """Bars: globe's and transformers' / huggingface_hub's (loading, writing, downloading) off above INFO, and off
    when stderr is not a terminal unless --progress."""
    from globe.progress import show_progress
    show_progress(forced)
    quiet = getattr(logging, level) > logging.INFO or not (forced or sys.stderr.isatty())
    if not quiet and not forced:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1" if quiet else "0"      # read when huggingface_hub is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar() if quiet else hf_logging.enable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        disable_progress_bars() if quiet else enable_progress_bars()


def pick_device(args: argparse.Namespace) -> None:
    """--device auto (the default of every command that computes) becomes the device it picks, and the log says
    which: cuda, then mps, then cpu."""
    if getattr(args, "device", None) != "auto":
        return
    from globe.device import resolve_device
    args.device = resolve_device("auto").type
    log.info("device: %s (--device auto: cuda, then mps, then cpu)", args.device, extra={"hold": True})


class HoldUntilWork(logging.Filter):
    """Holds log records marked `hold` (the device --device auto picked) until the command logs anything else,
    i.e. until work begins: a command refused on its inputs prints its one error line and nothing before it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hold", False):
            record.hold = False
            self.held.append(record)
            return False
        held, self.held = self.held, []
        for earlier in held:                                 # emitted first, through the same handlers
            for handler in logging.getLogger().handlers:
                handler.handle(earlier)
        return True


def resolve_model_args(args: argparse.Namespace) -> None:
    """Hub ids in MODEL_DIR / --model become local snapshot directories (see globe.io.hub)."""
    for name in ("model_dir", "model"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, str(resolve_model_dir(value)))


if __name__ == "__main__":
    sys.exit(main())
