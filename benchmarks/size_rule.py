"""The tuning run of the --size rule (globe.fit.planning.bytes.SIZE_RULE): on the TUNING model only (the embedded
globe-tiny-moe; never the evaluation models), every kind of family the size solver can build (factors only, a
small GloBE part + quantized residuals, plain quantization) is fitted at each size of a grid of bits per routed
gate/up weight, through the product's own config (benchmarks/bytes_product.product_config with the kind forced),
and scored by KL to the original on the second half of its heldout.txt (the first half calibrates). The rule's
thresholds are the sizes from which each kind has the lowest KL: benchmarks/results/size_rule.json.

    OMP_NUM_THREADS=1 python benchmarks/size_rule.py
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bytes import prepare  # noqa: E402
from benchmarks.bytes_product import product_row  # noqa: E402

KINDS = ("factors", "residual", "plain")
GRID = (2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5)


def thresholds(rows: list[dict]) -> dict[str, float | None]:
    """The smallest grid size from which a kind (residual, plain) is the best at every larger size measured."""
    best = {}
    for bits in sorted({r["target_bits"] for r in rows}):
        at = [r for r in rows if r["target_bits"] == bits]
        best[bits] = min(at, key=lambda r: r["kl"])["kind"]
    out: dict[str, float | None] = {}
    for kind, beaten_by in (("residual", ("residual", "plain")), ("plain", ("plain",))):
        sizes = sorted(best)
        start = None
        for bits in reversed(sizes):
            if best[bits] in beaten_by:
                start = bits
            else:
                break
        out[f"{kind}_from_bits"] = start
    return {"best_kind": {str(k): v for k, v in best.items()}, **out}


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "globe" / "assets" / "globe-tiny-moe"))
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--kl-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stats-dir", default=str(REPO / "runs" / "bytes"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "size_rule.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("globe").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ctx = prepare(Path(args.model), args)
    report = {"model": ctx["info"], "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for bits in args.grid:
        for kind in KINDS:
            row = product_row(ctx, bits, args, kind)
            if row["kind"] != kind:                      # the kind does not fit this size: the solver fell back
                continue
            report["rows"].append(row)
        report["rule"] = thresholds(report["rows"])
        report["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(Path(args.out), json.dumps(report, indent=1, default=float))
    print(json.dumps(report["rule"], indent=1))
    return report


if __name__ == "__main__":
    main()
