"""PNG plots of a GloBE artifact (matplotlib, Agg backend): the report `globe eval --plots DIR` writes.

    write_plots("plots/", artifact="out/", sweep="benchmarks/results/quality.json")

error_vs_budget.png   relative error vs stored params / dense: the artifact's families, and every method of a
                      budget sweep JSON (per-expert SVD, per-layer bank, GloBE) when one is given
per_layer_error.png   relative error of each layer, per family
support_hist.png      histogram of the number of atoms per expert (code support)
atom_popularity.png   experts using each atom, atoms sorted by popularity
am_history.png        temperature and relative error per alternating-minimisation iteration
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from globe.artifact import load
from globe.core.result import FitResult
from globe.errors import ArtifactError

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ArtifactError("plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def sweep_points(sweep: dict) -> dict[str, list[tuple[float, float]]]:
    """(params ratio, rel_err) per method from a benchmarks/quality.py JSON: svd, per-layer bank, best GloBE."""
    series: dict[str, list[tuple[float, float]]] = {}
    for family, rows in sweep.get("families", {}).items():
        for row in rows:
            dense = row["dense_params"]
            for method in ("svd", "per_layer_bank"):
                if method in row:
                    series.setdefault(f"{method} ({family})", []).append((row[method]["params"] / dense,
                                                                         row[method]["rel_err"]))
            if row.get("globe"):
                best = min(row["globe"], key=lambda g: g["rel_err"])
                series.setdefault(f"GloBE sweep ({family})", []).append((best["params"] / dense, best["rel_err"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_error_vs_budget(plt, families: dict, sweep: dict | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in (sweep_points(sweep) if sweep else {}).items():
        ax.plot(*zip(*pts), marker="o", linestyle="--" if "GloBE" not in name else "-", label=name)
    for name, fam in families.items():
        params = fam.metrics.get("params", {})
        if params.get("dense"):
            ax.scatter([params["stored"] / params["dense"]], [fam.metrics["rel_err"]], marker="*", s=150, zorder=5,
                       label=f"this artifact ({name})")
    ax.set(xlabel="stored params / dense params", ylabel="relative Frobenius error", title="error vs parameter budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_per_layer(plt, families: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fam in families.items():
        per_layer = {int(k): v for k, v in fam.metrics.get("rel_err_per_layer", {}).items()}
        if per_layer:
            layers = sorted(per_layer)
            ax.plot(layers, [per_layer[l] for l in layers], marker="o", label=name)
    ax.set(xlabel="layer", ylabel="relative error", title="per-layer error")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_support(plt, families: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fam in families.items():
        support = (fam.codes != 0).sum(-1).tolist()                          # atoms per expert
        ax.hist(support, bins=range(0, max(support) + 2), alpha=0.6, label=name, align="left")
    ax.set(xlabel="atoms per expert (support)", ylabel="experts", title="code support")
    ax.legend()
    return _save(fig, path)


def plot_popularity(plt, families: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fam in families.items():
        popularity = sorted((fam.codes != 0).sum(0).tolist(), reverse=True)  # experts per atom
        ax.bar([i + 0.4 * list(families).index(name) for i in range(len(popularity))], popularity, width=0.4,
               label=name)
    ax.set(xlabel="atom (sorted by popularity)", ylabel="experts using it", title="atom popularity")
    ax.legend()
    return _save(fig, path)


def plot_am_history(plt, families: dict, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for name, fam in families.items():
        am = fam.history.get("am", [])
        top.plot(range(len(am)), [row["rel_err"] for row in am], marker=".", label=name)
        bottom.plot(range(len(am)), [row["temperature"] for row in am], marker=".", label=name)
    top.set(ylabel="relative error", title="alternating minimisation")
    bottom.set(xlabel="AM iteration", ylabel="temperature T", yscale="log")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def write_plots(out_dir: str | Path, artifact=None, sweep: str | Path | dict | None = None) -> list[Path]:
    """Write the PNGs for an artifact (directory or FitResult) and/or a sweep JSON into out_dir; their paths."""
    if artifact is None and sweep is None:
        raise ArtifactError("nothing to plot: pass an artifact (--globe OUT) or a budget sweep (--sweep JSON)")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = artifact if isinstance(artifact, FitResult) or artifact is None else load(artifact)
    if isinstance(sweep, (str, Path)):
        sweep = json.loads(Path(sweep).read_text())
    families = result.families if result is not None else {}
    paths = [plot_error_vs_budget(plt, families, sweep, out / "error_vs_budget.png")]
    if families:
        paths += [plot_per_layer(plt, families, out / "per_layer_error.png"),
                  plot_support(plt, families, out / "support_hist.png"),
                  plot_popularity(plt, families, out / "atom_popularity.png")]
        if any(f.history.get("am") for f in families.values()):
            paths.append(plot_am_history(plt, families, out / "am_history.png"))
    plt.close("all")
    log.info("plots written to %s: %s", out, ", ".join(p.name for p in paths))
    return paths
