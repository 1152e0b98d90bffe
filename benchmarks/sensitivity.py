"""The budget where the model feels it: `globe compress` with the sensitivity probe weighting the fit's layers
(`--sensitivity on`, globe.calibration.sensitivity + globe.fit.objectives.sensitivity) against every layer alike
(`--sensitivity off`, the behaviour before), at the same options otherwise.

For each model, each cut (default 25, 35, 40 % of the model's total parameters: a parameter target, 8-bit
factors; `none`: the no-option main job, budget 0.6 at 4-bit) and each variant, the command's own parser builds
the command's own config from `compress MODEL -o TMP [--total-cut C] --text MODEL/heldout.txt --eval-tokens N
--seed S` + the variant's options (VARIANTS: on: the weights c (activation.sensitivity_power 1), half: c ** 0.5
(the default), off: every layer alike (the behaviour before); on-noquant: unquantized factors; ranks /
ranks-off: `--rank-allocation sensitivity`, a rank per layer, unquantized, with the probe on / off), and
globe.run.compress runs it as the command does (self-calibrated, the whole-expert and quantized expert phases where
they apply). Scored: KL(original || compressed) per token in nats,
top-1 agreement, perplexity over the first N held-out tokens; stored params per family; bytes by the byte model;
user CPU seconds of the row (this process and its evaluation children, single thread), the probe's own seconds
and the per-layer weights the fit applied. Models: `embedded` (globe/assets/globe-tiny-moe: where the default is
chosen) or names in benchmarks/models/. One JSON (--out), rewritten after every row (a killed run leaves the rows
done so far).

    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py [MODEL ...] [--cuts 0.25 0.35 0.4 none] [--variants half off]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import new_report, quiet_logging, run_compress_argv  # noqa: E402

log = logging.getLogger("benchmarks.sensitivity")
VARIANTS = {"on": ("--sensitivity", "on"), "off": ("--sensitivity", "off"), "half": ("--sensitivity", "on"),
            "on-noquant": ("--sensitivity", "on", "--no-quant"),
            "ranks": ("--sensitivity", "on", "--rank-allocation", "sensitivity"),     # unquantized (a rank per layer)
            "ranks-off": ("--sensitivity", "off", "--rank-allocation", "sensitivity")}
POWERS = {"on": 1.0, "half": 0.5}   # activation.sensitivity_power of a variant (else the config's default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=["embedded"], help="embedded or names in benchmarks/models/ (default embedded)")
    a("--cuts", nargs="+", default=["0.25", "0.35", "0.4", "none"],
      help="cuts of TOTAL params, or none for the no-option main job (default 0.25 0.35 0.4 none)")
    a("--variants", nargs="+", default=["half", "off"], choices=list(VARIANTS),
      help="default: half off (the default and the behaviour before)")
    a("--eval-tokens", type=int, default=16384, help="score the first N held-out tokens (default 16384)")
    a("--seed", type=int, default=0, help="seed of the self-calibration and the fit (default 0)")
    a("--extra", nargs=argparse.REMAINDER, default=[],
      help="further `globe compress` options for every row, last on the line")
    a("--out", default=str(REPO / "benchmarks" / "results" / "sensitivity.json"), help="JSON output path")
    return p.parse_args(argv)


def model_dir(name: str) -> str:
    from globe.assets import DEFAULT_MODEL_DIR
    return str(DEFAULT_MODEL_DIR) if name == "embedded" else str(REPO / "benchmarks" / "models" / name)


def compress_row(name: str, cut: str, variant: str, args, work: Path) -> dict:
    """One `globe compress` run through the command's parser and config; its JSON row."""
    from globe.fit.planning.bytes import result_bytes
    from globe.run.fit import total_cut_of
    model = model_dir(name)
    target = [] if cut == "none" else ["--total-cut", cut]
    argv = ["compress", model, "-o", str(work / "compressed"), *target, "--overwrite", "--device", "cpu", "--seed",
            str(args.seed), "--text", str(Path(model) / "heldout.txt"), "--eval-tokens", str(args.eval_tokens),
            *VARIANTS[variant], *args.extra]

    def adjust(cfg) -> None:
        cfg.activation.sensitivity_power = POWERS.get(variant, cfg.activation.sensitivity_power)
    cfg, done, cpu = run_compress_argv(argv, adjust)
    result, ev = done["result"], done["evaluation"]
    b = result_bytes(result)
    div = ev["compressed"]["divergence"]
    fams = result.families
    probe = (result.source.get("calibration") or {}).get("sensitivity")
    return {"model": name, "cut": cut, "variant": variant, "command": "globe " + " ".join(argv[:2] + argv[4:]),
            "bits": cfg.quant.bits, "total_cut_achieved": total_cut_of(result),
            "sensitivity_power": cfg.activation.sensitivity if not cfg.activation.sensitivity
            else cfg.activation.sensitivity_power,
            "stored_params": {f: fam.param_count()["stored"] for f, fam in fams.items()},
            "shape": {f: {"m": fam.shape["m"], "r": fam.shape["r"],
                          "ranks": list(fam.ranks) if fam.ranks else None} for f, fam in fams.items()},
            "kl": div["kl"], "top1": div["top1"], "perplexity": ev["compressed"]["perplexity"]["perplexity"],
            "original_perplexity": ev["original"]["perplexity"]["perplexity"],
            "eval_tokens": ev["compressed"]["perplexity"]["tokens"], "bytes": int(b["after"]),
            "probe_seconds": probe.get("seconds") if probe else None,
            "weights": {f: (fam.metrics.get("sensitivity") or {}).get("weights") for f, fam in fams.items()},
            "expert_weights": (fams["gate"].metrics.get("expert_sensitivity") or {}).get("weights")
            if "gate" in fams else None,
            "probe_kl": probe.get("kl") if probe else None, "cpu_user_seconds": round(cpu, 1)}


def main(argv: list[str] | None = None) -> dict:
    quiet_logging()
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else new_report(args)
    report.setdefault("rows", [])

    def save() -> None:
        from globe.core.files import atomic_write_text
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")

    for name in args.models:
        for cut in args.cuts:
            for variant in args.variants:
                with tempfile.TemporaryDirectory(prefix="sens-") as tmp:
                    row = compress_row(name, cut, variant, args, Path(tmp))
                log.info("%s %s %s: KL %.6f, top-1 %.4f, ppl %.4f, %.0f s CPU", name, cut, variant, row["kl"],
                         row["top1"], row["perplexity"], row["cpu_user_seconds"])
                print(json.dumps({k: row[k] for k in ("model", "cut", "variant", "kl", "top1", "perplexity",
                                                      "stored_params", "cpu_user_seconds")}), flush=True)
                report["rows"] = [r for r in report["rows"]
                                  if (r["model"], r["cut"], r["variant"]) != (name, cut, variant)] + [row]
                save()
    return report


if __name__ == "__main__":
    main()
