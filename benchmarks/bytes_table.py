"""The README's "Bytes" table and plot from benchmarks/results/bytes.json (written by benchmarks/bytes.py).

For each model and each quantizer size of the GPTQ frontier (bits per routed weight, scales included): the best
quantizer's KL at that size, the best GloBE result at no more bits (any GloBE variant) and the ratio of the two
KLs. The plot: KL against bits per routed weight, every method's points and the best quantizer's frontier (dashed),
one panel per model.

    python benchmarks/bytes_table.py                   # prints the markdown table, writes benchmarks/results/bytes.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table(data: dict) -> str:
    rows = ["| model | bits / weight | best quantizer | its KL | GloBE (at no more bits) | its bits | its KL | "
            "KL ratio |", "|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        name = Path(model["model"]["dir"]).name
        for c in model["comparison"]:
            rows.append(f"| {name} | {c['bits']:.2f} | {c['quantizer']} | {c['quantizer_kl']:.2e} | {c['globe']} | "
                        f"{c['globe_bits']:.2f} | {c['globe_kl']:.2e} | {c['ratio']:.2f} |")
    return "\n".join(rows)


def plot(data: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for row in model["rows"]:
            if row.get("kl") is not None and row.get("bits_per_weight") is not None:
                by_method.setdefault(row["method"], []).append((row["bits_per_weight"], row["kl"]))
        for method, points in sorted(by_method.items()):
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker="o" if "globe" in method else "s",
                       s=14, label=method)
        front = model["quantizer_frontier"]
        ax.plot([f[0] for f in front], [f[1] for f in front], "k--", linewidth=1, label="best quantizer")
        ax.set_xscale("linear")
        ax.set_yscale("log")
        ax.set_xlim(1, 6)
        ax.set_xlabel("bits per routed gate/up weight (scales included)")
        ax.set_ylabel("KL to the original (nats / token)")
        ax.set_title(Path(model["model"]["dir"]).name)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(REPO / "benchmarks/results/bytes.json"), help="bytes.py's output")
    p.add_argument("--png", default=str(REPO / "benchmarks/results/bytes.png"), help="plot to write")
    args = p.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    print(table(data))
    plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
