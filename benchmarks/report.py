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
