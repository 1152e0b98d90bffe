"""What the factors' storage costs at a PARAMETER target: `globe compress MODEL --total-cut C` with 4-bit, 8-bit
(group 64 GPTQ) and unquantized (the model's dtype) factors, scored on the model's held-out text.

For each cut (default 25, 35, 40 % of the model's total parameters) and each storage (default `--bits 4`,
`--bits 8`, `--no-quant`), the command's own parser builds the command's own config (globe.cli.compress) from
`compress MODEL -o TMP --total-cut C --text MODEL/heldout.txt --eval-tokens N --seed S` + the storage's options, and
globe.run.compress runs it as the command does: self-calibrated on the same seeded tokens, the activation-aware fit,
the whole-expert phase, the quantized expert phase where it applies, the compressed export, the evaluation
(KL(original || compressed) per token in nats, top-1 agreement, perplexity, over the same first N held-out tokens
for every row). Bytes: the checkpoint's tensors by the byte model (globe.fit.planning.bytes.result_bytes: the whole
checkpoint and the compressed families). CPU: user seconds of this process and its evaluation children. Default
model: the embedded one (where the default is chosen; never the evaluation models). One JSON (--out), rewritten
after every row.

    OMP_NUM_THREADS=1 python benchmarks/param_target_bits.py
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

log = logging.getLogger("benchmarks.param_target_bits")
STORAGES = {"bits4": ("--bits", "4"), "bits8": ("--bits", "8"), "no-quant": ("--no-quant",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from globe.assets import DEFAULT_MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("model", nargs="?", default=str(DEFAULT_MODEL_DIR), help="model directory (default: the embedded model)")
    a("--cuts", type=float, nargs="+", default=[0.25, 0.35, 0.40], help="cuts of TOTAL params (default 25 35 40 %%)")
    a("--storages", nargs="+", default=list(STORAGES), choices=list(STORAGES),
      help="factor storages (default: all: --bits 4, --bits 8, --no-quant)")
    a("--text", help="held-out text (default MODEL/heldout.txt)")
    a("--eval-tokens", type=int, default=16384, help="score the first N held-out tokens (default 16384)")
    a("--seed", type=int, default=0, help="seed of the self-calibration and the fit (default 0)")
    a("--extra", nargs=argparse.REMAINDER, default=[],
      help="further `globe compress` options for every row (short runs of the tests), last on the line")
    a("--out", default=str(REPO / "benchmarks" / "results" / "param_target_bits.json"), help="JSON output path")
    return p.parse_args(argv)


def compress_row(model: str, cut: float, storage: str, args, work: Path) -> dict:
    """One `globe compress` run through the command's parser and config; its JSON row."""
    from globe.fit.planning.bytes import result_bytes
    from globe.run.fit import total_cut_of
    argv = ["compress", model, "-o", str(work / "compressed"), "--total-cut", str(cut), "--overwrite",
            "--device", "cpu", "--seed", str(args.seed), "--text", args.text, "--eval-tokens", str(args.eval_tokens),
            *STORAGES[storage], *args.extra]
    cfg, done, cpu = run_compress_argv(argv)
    result, ev = done["result"], done["evaluation"]
    b = result_bytes(result)
    div = ev["compressed"]["divergence"]
    fams = result.families
    return {"cut": cut, "storage": storage, "command": "globe " + " ".join(argv[:2] + argv[4:]),
            "bits": cfg.quant.bits, "quant_steps": cfg.expert.quant_steps, "expert_steps": cfg.expert.steps,
            "total_cut_achieved": total_cut_of(result),
            "params": {f: int(result.params[f]) for f in fams},
            "shape": {f: {"m": fam.shape["m"], "r": fam.shape["r"]} for f, fam in fams.items()},
            "quant": {f: {k: f"{q.bits}-bit, groups of {q.group}" for k, q in fam.quant.items()} or None
                      for f, fam in fams.items()},
            "kl": div["kl"], "top1": div["top1"],
            "perplexity": ev["compressed"]["perplexity"]["perplexity"],
            "original_perplexity": ev["original"]["perplexity"]["perplexity"],
            "eval_tokens": ev["compressed"]["perplexity"]["tokens"],
            "bytes": int(b["after"]), "source_bytes": int(b["before"]),
            "family_bytes": {f: int(v["stored"]) for f, v in b["families"].items()},
            "bits_per_routed_weight": 8 * sum(v["stored"] for v in b["families"].values())
            / (sum(v["dense"] for v in b["families"].values()) / b["value_bytes"]),
            "cpu_user_seconds": round(cpu, 1)}


def print_table(report: dict) -> None:
    rows = report["rows"]
    print(f"{'cut':>5} {'storage':9} {'KL':>9} {'top-1':>7} {'ppl':>8} {'MB':>7} {'bits/w':>6} {'KL/bf16':>7}")
    bf16 = {r["cut"]: r["kl"] for r in rows if r["storage"] == "no-quant"}
    for r in rows:
        ratio = f"{r['kl'] / bf16[r['cut']]:.3f}" if r["cut"] in bf16 else "-"
        print(f"{100 * r['cut']:4.0f}% {r['storage']:9} {r['kl']:9.6f} {r['top1']:7.4f} {r['perplexity']:8.4f} "
              f"{r['bytes'] / 1e6:7.3f} {r['bits_per_routed_weight']:6.2f} {ratio:>7}")


def main(argv: list[str] | None = None) -> dict:
    quiet_logging()
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.text = args.text or str(Path(args.model) / "heldout.txt")
    report = new_report(args)
    report["rows"] = []
    out = Path(args.out)

    def save() -> None:
        from globe.core.files import atomic_write_text
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")

    for cut in args.cuts:
        for storage in args.storages:
            with tempfile.TemporaryDirectory(prefix="param-bits-") as tmp:
                row = compress_row(args.model, cut, storage, args, Path(tmp))
            log.info("-%.0f%% %s: KL %.6f, top-1 %.4f, ppl %.4f, %d bytes, %.0f s CPU", 100 * cut, storage,
                     row["kl"], row["top1"], row["perplexity"], row["bytes"], row["cpu_user_seconds"])
            report["rows"].append(row)
            save()
    print_table(report)
    return report


if __name__ == "__main__":
    main()
