"""What every benchmark's JSON report starts with, and the logging every benchmark script uses."""
from __future__ import annotations

import argparse
import logging
import platform

import torch


def quiet_logging() -> None:
    """INFO for the benchmark's own lines; globe and transformers only from WARNING up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("globe", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def new_report(args: argparse.Namespace, leave_out: tuple[str, ...] = ("out",)) -> dict:
    """{"settings": the options but `leave_out`, "machine": torch version / threads / cpu, "models": []}."""
    return {"settings": {k: v for k, v in vars(args).items() if k not in leave_out},
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine()}, "models": []}


def cpu_seconds() -> float:
    """User CPU seconds of this process and its finished children (the isolated evaluations)."""
    import resource
    return sum(resource.getrusage(who).ru_utime for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def run_compress_argv(argv: list[str], adjust=None) -> tuple:
    """`globe compress` run through the command's own parser and config (argv from "compress" on), `adjust(cfg)`
    applied to its config first; (cfg, run_compress's dict, its user CPU seconds)."""
    from globe.cli import compress as cli
    from globe.cli.main import build_parser
    from globe.run.compress import run_compress
    parsed = build_parser().parse_args(argv)
    cfg, plans = cli._config_plans(parsed)
    if adjust is not None:
        adjust(cfg)
    t0 = cpu_seconds()
    done = run_compress(cli.compress_run(parsed, cfg, plans, "globe " + " ".join(argv)))
    return cfg, done, cpu_seconds() - t0
