"""How evenly self-generated, real and mixed calibration text cover the routed experts: per-expert routed token
counts and the effective rank and spread of the per-expert input second moments C_e = sum_t x_t x_t^T.

For each model, the statistics of `globe compress`'s calibration are collected on --tokens tokens of each source:
  self   sampled by the model itself (globe.calibration.self_text, seed 0, 256-token sequences: compress's default)
  real   the first --tokens tokens of MODEL/calib.txt (--split-heldout F: of MODEL/heldout.txt's first F, the
         embedded model's only text beside its training corpus)
  mixed  both (globe.run.calibrate's mixed calibration, --calibration-mix 1: 2 x --tokens tokens)
and summarised per source over all MoE layers:
  counts      routed tokens per expert: min, 10th percentile and median over (layer, expert), their coefficient of
              variation per layer (mean over layers), and the share of experts below --rare tokens
  eff_rank    effective rank exp(entropy of the normalised eigenvalues) of each C_e: mean, and mean over the
              quarter of experts with the fewest routed tokens in each layer (the rare experts)
  spread      ||C_e / tr C_e - C_layer / tr C_layer||_F / ||C_layer / tr C_layer||_F, mean over experts (how far each
              expert's input distribution is from its layer's; 0: every expert sees the layer's input)
One JSON (--out). Never used to choose a default on the evaluation models (only to explain what they measure).

    OMP_NUM_THREADS=1 python benchmarks/calibration_coverage.py globe/assets/globe-tiny-moe --split-heldout 0.45
    OMP_NUM_THREADS=1 python benchmarks/calibration_coverage.py benchmarks/models/*
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import new_report, quiet_logging  # noqa: E402
from benchmarks.self_calibration import split_heldout  # noqa: E402


def effective_rank(c: torch.Tensor) -> torch.Tensor:
    """[..., d, d] PSD -> [...] exp(entropy of eigenvalues / their sum); 0 where C is 0."""
    ev = torch.linalg.eigvalsh(c).clamp_min(0)
    total = ev.sum(-1, keepdim=True)
    p = ev / total.clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def summary(stats, rare: int) -> dict:
    counts = stats.counts.double()                                         # [L, E]
    c = stats.hidden_expert.double()                                       # [L, E, d, d]
    trace = c.diagonal(dim1=-2, dim2=-1).sum(-1)                           # [L, E]
    layer = stats.hidden.double()                                          # [L, d, d]
    layer_n = layer / layer.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    norm = c / trace.clamp_min(1e-300)[..., None, None]
    spread = (norm - layer_n[:, None]).flatten(2).norm(dim=-1) / layer_n.flatten(1).norm(dim=-1)[:, None]
    ranks = effective_rank(c)                                              # [L, E]
    quarter = max(1, counts.shape[1] // 4)
    rare_idx = counts.argsort(dim=1)[:, :quarter]                          # [L, E/4] fewest routed tokens
    rare_ranks = ranks.gather(1, rare_idx)
    cv = counts.std(dim=1) / counts.mean(dim=1)
    flat = counts.flatten()
    return {"tokens": int(stats.tokens),
            "counts": {"min": int(flat.min()), "p10": float(flat.quantile(0.1)), "median": float(flat.median()),
                       "max": int(flat.max()), "cv_mean": round(float(cv.mean()), 4),
                       f"share_below_{rare}": round(float((flat < rare).double().mean()), 4),
                       "rare_quarter_mean": round(float(counts.gather(1, rare_idx).mean()), 1)},
            "eff_rank": {"mean": round(float(ranks.mean()), 2), "rare_quarter_mean": round(float(rare_ranks.mean()), 2),
                         "layer_mean": round(float(effective_rank(layer).mean()), 2), "d": int(c.shape[-1])},
            "spread": {"mean": round(float(spread.mean()), 4),
                       "rare_quarter_mean": round(float(spread.gather(1, rare_idx).mean()), 4)}}


def model_entry(model_dir: Path, args) -> dict:
    from globe.run.calibrate import CalibrateRun, run_calibrate_with_ids
    work = Path(tempfile.mkdtemp(prefix="calibration-coverage-"))
    calib = split_heldout(model_dir, args.split_heldout, work)[0] if args.split_heldout else \
        str(model_dir / "calib.txt")
    out = {"model": model_dir.name, "calib": calib if not args.split_heldout else
           f"heldout.txt, first {args.split_heldout:g}", "sources": {}}
    for source, text, own in (("self", None, 0), ("real", calib, 0), ("mixed", calib, args.tokens)):
        run = CalibrateRun(str(model_dir), text, str(work / f"{source}.safetensors"), max_tokens=args.tokens,
                           seed=0, flag="--calib", self_tokens=own)
        stats, _ = run_calibrate_with_ids(run)
        out["sources"][source] = summary(stats, args.rare)
        print(model_dir.name, source, json.dumps(out["sources"][source]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens per source (default 8192)")
    p.add_argument("--rare", type=int, default=64, help="an expert with fewer routed tokens is rare (default 64)")
    p.add_argument("--split-heldout", type=float, metavar="F", help="as benchmarks/self_calibration.py's")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "calibration_coverage.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet_logging()
    report = new_report(args, ("out", "models"))
    out = Path(args.out)
    if out.is_file():                                       # one file for every model: entries replaced by name
        report["models"] = [m for m in json.loads(out.read_text())["models"]
                            if m["model"] not in {Path(d).resolve().name for d in args.models}]
    for model_dir in args.models:
        report["models"].append(model_entry(Path(model_dir).resolve(), args))
        atomic_write_text(out, json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
