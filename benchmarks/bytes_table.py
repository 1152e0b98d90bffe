"""The README's "Bytes" table and plot from benchmarks/results/bytes.json (written by benchmarks/bytes.py).

For each model and each quantizer size of the GPTQ frontier (bits per routed weight, scales included): the best
quantizer's KL at that size, the best GloBE result at no more bits (any GloBE variant) and the ratio of the two
KLs. The plot: KL against bits per routed weight, every method's points and the best quantizer's frontier (dashed),
one panel per model.

    python benchmarks/bytes_table.py                   # prints the markdown table, writes benchmarks/results/bytes.png
    python benchmarks/bytes_table.py --product benchmarks/results/bytes_product.json --png benchmarks/results/bytes_product.png
    python benchmarks/bytes_table.py --pruning benchmarks/results/bytes_pruning.json

--product: benchmarks/bytes_product.py's output (the product path, `globe compress --size`, against GPTQ, RTN and
HQQ at every bits / group in the same run): one table row per size (the kind kept, its bits, KL, top-1 and
perplexity; the best quantizer within the size and the best GPTQ row; the KL ratios) and a plot per model of KL
against bits per routed weight: every quantizer row, each quantizer's frontier, and the product curve. Where the run
has bytes_product.py --bf16's rows (bf16 GloBE, bf16 MoBE at its best), a second table gives their KL and ratios to
the product row and to the best quantizer at each size, and the plot shows their points.

    python benchmarks/bytes_table.py --product benchmarks/results/bytes_bf16.json --png benchmarks/results/bytes_bf16.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
    fig, axes = _panels(len(data["models"]))
    for ax, model in zip(axes[0], data["models"]):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for row in model["rows"]:
            if row.get("kl") is not None and row.get("bits_per_weight") is not None:
                by_method.setdefault(row["method"], []).append((row["bits_per_weight"], row["kl"]))
        for method, points in sorted(by_method.items()):
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker="o" if "globe" in method else "s",
                       s=14, label=method)
        front = model["quantizer_frontier"]
        ax.plot([f[0] for f in front], [f[1] for f in front], "k--", linewidth=1, label="best quantizer")
        ax.set_xlim(1, 6)
        _finish(ax, model, "bits per routed gate/up weight (scales included)")
    _save(fig, axes, out)


def _panels(count: int):
    """(figure, axes [1, count]): one panel per model, Agg canvas."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)


def _finish(ax, model: dict, xlabel: str) -> None:
    """Log KL axis, labels, the model's name as title, a light grid."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL to the original (nats / token)")
    ax.set_title(Path(model["model"]["dir"]).name)
    ax.grid(True, alpha=0.3)


def _save(fig, axes, out: Path) -> None:
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def product_table(data: dict) -> str:
    """One row per (model, --size): the kind kept against the best quantizer within the size and the best GPTQ."""
    rows = ["| model | --size (bits / weight) | kept | its bits | KL | top-1 | ppl | best quantizer within the size | "
            "its KL | top-1 | ppl | KL ratio | best GPTQ: KL ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        name = Path(model["model"]["dir"]).name
        quant = {(r["method"], r["bits"], r["group"]): r for m in ("gptq", "rtn", "hqq") for r in model.get(m, [])}
        for c in model["comparison"]:
            best = c.get("best_quantizer")
            q = quant.get(tuple(_parse_quantizer(best))) if best else None
            rows.append(f"| {name} | {c['target_bits']:.2f} | {_kept(model, c)} | {c['bits']:.2f} | "
                        f"{c['kl']:.2e} | {c['top1']:.4f} | {c['ppl']:.2f} | "
                        + (f"{best} ({q['bits_per_weight']:.2f} bits) | {q['kl']:.2e} | {q['top1']:.4f} | "
                           f"{q['ppl']:.2f} | **{c['ratio_best_quantizer']:.2f}** | {c['ratio']:.2f} |" if q
                           else "none fits | - | - | - | - | - |"))
    return "\n".join(rows)


def bf16_table(data: dict) -> str:
    """bytes_product.py --bf16's rows: at each size, bf16 GloBE's and bf16 MoBE's bits and KL, and their KL ratios to
    the product row and to the best quantizer within the size ("" where the run has none)."""
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    rows = ["| model | --size (bits / weight) | bf16 GloBE: bits | KL | / product | / best quantizer | bf16 MoBE: bits "
            "| KL | / product | / best quantizer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        name = Path(model["model"]["dir"]).name
        for c in model.get("bf16_comparison", []):
            rows.append(f"| {name} | {c['target_bits']:.2f} | {num(c['globe_bf16_bits'], '.2f')} | "
                        f"{num(c['globe_bf16_kl'], '.2e')} | {num(c['globe_bf16/product'], '.1f')}x | "
                        f"{num(c['globe_bf16/best_quantizer'], '.1f')}x | {num(c['mobe_bits'], '.2f')} | "
                        f"{num(c['mobe_kl'], '.2e')} | {num(c['mobe/product'], '.1f')}x | "
                        f"{num(c['mobe/best_quantizer'], '.1f')}x |")
    return "\n".join(rows) if len(rows) > 2 else ""


def pruning_table(data: dict, sizes: list[float]) -> str:
    """bytes_product.py --pruning's rows: at each size, the best REAP row (alone in bf16, or + GPTQ of the kept
    experts) within it, beside the best GPTQ row within it."""
    rows = ["| model | size (bits / weight) | best REAP (+ GPTQ) within the size | its bits | KL | top-1 | best GPTQ "
            "within the size | its KL |", "|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        name = Path(model["model"]["dir"]).name
        for size in sizes:
            prune = [r for r in model.get("pruning", []) if r["bits_per_weight"] <= size + 1e-9]
            gptq = [r for r in model.get("gptq", []) if r["bits_per_weight"] <= size + 1e-9]
            best = min(prune, key=lambda r: r["kl"]) if prune else None
            g = min(gptq, key=lambda r: r["kl"]) if gptq else None
            what = best and (f"{best['experts_kept']}/{best['experts']} experts, "
                             + ("bf16" if best["bits"] is None else f"GPTQ {best['bits']}-bit group {best['group']}"))
            rows.append(f"| {name} | {size:.2f} | {what or 'none fits'} | "
                        + (f"{best['bits_per_weight']:.2f} | {best['kl']:.3g} | {best['top1']:.4f} | " if best
                           else "- | - | - | ")
                        + (f"{g['bits']}-bit group {g['group']} | {g['kl']:.2e} |" if g else "none fits | - |"))
    return "\n".join(rows)


def _kept(model: dict, comparison: dict) -> str:
    """Short label of the kind a size kept: "plain 3-bit group 128" or "4-bit factors group 64, budget 0.52"."""
    row = next((r for r in model["product"] if r["target_bits"] == comparison["target_bits"]), None)
    plan = (row or {}).get("plan")
    if not plan:
        return comparison.get("describe") or comparison["kind"]
    if plan["kind"] == "plain":
        return f"plain {plan['residual_bits']}-bit group {plan['residual_group']}"
    from globe.fit.config import QuantSection
    group = plan["group"] or QuantSection().group                  # None: the fit's default group
    rank = f" rank {plan['rank']}" if plan.get("rank") else ""                # a pinned rank (SizePlan.rank)
    return f"{plan['bits']}-bit factors group {group}{rank}, budget {plan['budget']:.2f}"


def _parse_quantizer(text: str) -> tuple[str, int, int]:
    """"gptq 2-bit group 64" -> ("gptq", 2, 64)."""
    method, bits, _, group = text.split()
    return method, int(bits.split("-")[0]), int(group)


# bytes_product.py --bf16's rows on the product plot: (marker, colour, legend)
BF16_STYLE = {"bf16_globe": ("D", "tab:purple", "bf16 GloBE (--no-quant)"),
              "bf16_mobe": ("x", "tab:brown", "bf16 MoBE (its best)")}


def product_plot(data: dict, out: Path):
    """The plot of --product (written to out); returns the figure."""
    fig, axes = _panels(len(data["models"]))
    style = {"gptq": ("s", "tab:blue"), "rtn": ("^", "tab:orange"), "hqq": ("v", "tab:green")}
    for ax, model in zip(axes[0], data["models"]):
        for method, (marker, color) in style.items():
            rows = sorted(model.get(method, []), key=lambda r: r["bits_per_weight"])
            if not rows:
                continue
            ax.scatter([r["bits_per_weight"] for r in rows], [r["kl"] for r in rows], marker=marker, s=16,
                       color=color, label=f"{method} (2/3/4-bit, group 32/64/128)")
            front, best = [], math.inf
            for r in rows:
                if r["kl"] < best:
                    best = r["kl"]
                    front.append((r["bits_per_weight"], r["kl"]))
            ax.plot([f[0] for f in front], [f[1] for f in front], "--", color=color, linewidth=1)
        prod = sorted(model["product"], key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in prod], [r["kl"] for r in prod], "o-", color="tab:red", linewidth=2,
                label="globe compress --size")
        for r in prod:
            ax.annotate(r["kind"], (r["bits_per_weight"], r["kl"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        for key, (marker, color, label) in BF16_STYLE.items():              # bytes_product.py --bf16
            rows = sorted(model.get(key, []), key=lambda r: r["bits_per_weight"])
            if rows:
                ax.plot([r["bits_per_weight"] for r in rows], [r["kl"] for r in rows], marker + ":", color=color,
                        linewidth=1, label=label)
        _finish(ax, model, "bits per routed gate/up weight (scales and codes included)")
    _save(fig, axes, out)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(REPO / "benchmarks/results/bytes.json"), help="bytes.py's output")
    p.add_argument("--png", default=str(REPO / "benchmarks/results/bytes.png"), help="plot to write")
    p.add_argument("--product", metavar="JSON", help="benchmarks/bytes_product.py's output: its table and plot")
    p.add_argument("--pruning", metavar="JSON", help="benchmarks/bytes_product.py --pruning's output: the best REAP "
                   "(+ GPTQ) row within each of --sizes")
    p.add_argument("--sizes", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.6],
                   help="bits per routed weight of --pruning's table (default: bytes_product.py's sizes)")
    args = p.parse_args(argv)
    if args.pruning:
        print(pruning_table(json.loads(Path(args.pruning).read_text()), args.sizes))
        return 0
    if args.product:
        data = json.loads(Path(args.product).read_text())
        print(product_table(data))
        bf16 = bf16_table(data)
        if bf16:
            print("\n" + bf16)
        product_plot(data, Path(args.png))
        return 0
    data = json.loads(Path(args.json).read_text())
    print(table(data))
    plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
