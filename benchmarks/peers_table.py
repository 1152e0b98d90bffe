"""Markdown tables of a benchmarks/peers.py JSON: one table per model, one row per (cut, method), KL to the original
first (the headline) with top-1 agreement beside it, then each GloBE row against the best peer (KL ratio, goal
<= 0.5x; top-1 above every peer's) and the GloBE / MoBE ratios. The README's results section
is pasted from this output. Files written before KL was measured show "-" in its columns.

    python benchmarks/peers_table.py benchmarks/results/peers_eval_models.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("svd", "svd-llm", "d2moe", "d2moe-llm", "d2moe-sharev", "mobe", "mobe-best", "reap", "hc-smoe", "globe",
         "globe-nonlinear", "globe-aware", "globe-default", "globe-default-text")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def model_table(model: dict) -> list[str]:
    """Rows: cut, method, KL, top-1, gate / up weight error, routed output error, perplexity (+ increase), fit s,
    total params of the whole model (where the file has them)."""
    info = model["model"]
    lines = [f"**{Path(info['dir']).name}** ({info['layers']} layers x {info['experts']} experts, p={info['p']}, "
             f"d={info['d']}; original perplexity {info['original_perplexity']:.3f} on {info['heldout_tokens']:,} "
             "held-out tokens)", "",
             "| cut (budget/family) | method | KL (nats/token) | top-1 agreement | weight error gate / up | "
             "output error | perplexity (increase) | fit s | total params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cut in sorted(model["cuts"], key=lambda c: c["cut"]):
        rows = {r["method"]: r for r in cut["rows"]}
        for name in [m for m in ORDER if m in rows]:
            r = rows[name]
            lines.append(f"| -{100 * cut['cut']:.0f} % ({cut['budget_per_family']:.3f}) | {name} | "
                         f"{_num(r.get('kl'), '.5f')} | {_num(r.get('top1'), '.4f')} | "
                         f"{r['rel_err']['gate']:.3f} / {r['rel_err']['up']:.3f} | {r['output_rel_err']['rel_err']:.4f} | "
                         f"{r['perplexity']:.3f} (+{r['delta_ppl']:.3f}) | {r['fit_seconds']:.0f} | "
                         f"{_num(r.get('total_params'), ',')} |")
    best = [(cut, key, r) for cut in sorted(model["cuts"], key=lambda c: c["cut"])
            for key, r in cut["ratios"].items() if key.endswith("/best-peer")]
    if best:
        lines += ["", "| cut | GloBE row | KL / best peer's KL (goal <= 0.5) | best peer (its KL) | top-1 (best peer's) | "
                  "peers with top-1 >= GloBE's |", "|---|---|---|---|---|---|"]
        lines += [f"| -{100 * cut['cut']:.0f} % | {key.split('/')[0]} | {_num(r['kl'], '.2f')} | {r['best_peer']} "
                  f"({r['peer_kl']:.5f}) | {r['top1']:.4f} ({r['best_peer_top1']:.4f}) | "
                  f"{', '.join(r['top1_not_above']) or 'none'} |" for cut, key, r in best]
    lines += ["", "| cut | ratio to MoBE (defaults) | KL | weight gate | weight up | output error | "
              "perplexity increase |",
              "|---|---|---|---|---|---|---|"]
    for cut in sorted(model["cuts"], key=lambda c: c["cut"]):
        for key, ratio in cut["ratios"].items():
            if key.endswith("/mobe"):
                dppl = "n/a" if ratio["delta_ppl"] is None else f"{ratio['delta_ppl']:.2f}"
                lines.append(f"| -{100 * cut['cut']:.0f} % | {key.split('/')[0]} | {_num(ratio.get('kl'), '.2f')} | "
                             f"{ratio['gate']:.3f} | {ratio['up']:.3f} | {ratio['output']:.2f} | {dppl} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a benchmarks/peers.py output file")
    report = json.loads(Path(p.parse_args(argv).json).read_text())
    for model in report["models"]:
        print("\n".join(model_table(model)) + "\n")


if __name__ == "__main__":
    main()
