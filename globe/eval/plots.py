"""PNG plots of a GloBE artifact (matplotlib Figure objects, Agg canvas): the report `globe eval --plots DIR` writes.

    write_plots("plots/", artifact="out/", sweep="sweep.json")       # sweep.json from `globe sweep MODEL_DIR`
    figs = figures(globe.load("out/"))                               # {file name: matplotlib Figure}, not saved

error_vs_budget.png   relative error vs stored params / dense of every method of a budget sweep (per-expert SVD,
                      MoBE, GloBE) with the artifact's families as stars; only with a sweep of the artifact's model
                      (a sweep of other weights is refused, one that names no model is drawn "(model unknown)")
per_layer_error.png   relative error of each layer, per family
support_hist.png      histogram of the number of atoms per expert (code support), the target support as a line
atom_popularity.png   experts using each atom, atoms sorted by popularity
am_history.png        relative error, median support (target dashed) and temperature per AM iteration

Every title names the model (the artifact's source directory) and the families.
"""
from __future__ import annotations

import logging
from pathlib import Path

from globe.artifact import load
from globe.core.files import atomic_write, atomic_write_all
from globe.core.result import FitResult
from globe.errors import ArtifactError, GlobeError
from globe.formats.sweep import read_sweep
from globe.io import open_checkpoint

log = logging.getLogger(__name__)
NO_OFFSET = {"axes.formatter.useoffset": False}          # plain tick labels, never "1e-6 + ..." offsets
UNKNOWN = " (model unknown)"


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ArtifactError("plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    return matplotlib


def _figure(nrows: int = 1, height: float = 4, **kwargs):
    """A figure (not held by pyplot: nothing to close) and its axes, with offset-free tick labels."""
    matplotlib = _matplotlib()
    from matplotlib.figure import Figure
    with matplotlib.rc_context(NO_OFFSET):
        fig = Figure(figsize=(6, height))
        return fig, fig.subplots(nrows, 1, **kwargs)


def _integer_ticks(*axes_) -> None:
    from matplotlib.ticker import MaxNLocator
    for axis in axes_:
        axis.set_major_locator(MaxNLocator(integer=True))


def model_name(source: dict | None) -> str:
    """The name a plot gives the model: its checkpoint directory's name."""
    model_dir = (source or {}).get("model_dir")
    return Path(model_dir).name if model_dir else "unknown model"


def _title(result: FitResult, what: str) -> str:
    return f"{model_name(result.source)}: {what} ({', '.join(result.families)})"


# ---- budget sweeps ----
def sweep_model(sweep: dict) -> dict | None:
    """The model a sweep names: {"model_dir", "name", "content_hash"} (older benchmark files: a path), or None."""
    model = sweep.get("model")
    if isinstance(model, str):
        return {"model_dir": model, "name": Path(model).name}
    return model if isinstance(model, dict) and (model.get("content_hash") or model.get("model_dir")) else None


def check_sweep_model(sweep: dict, source: dict, where: str) -> str:
    """"" if the sweep was made on the weights the artifact was fitted on, UNKNOWN (with a warning) if the sweep
    names no model; ArtifactError naming the sweep file `where` if it names another one. The content hashes
    decide where both have one, the resolved model directories otherwise."""
    model = sweep_model(sweep)
    if model is None:
        log.warning("sweep %s names no model: drawing it under %s labelled%s (make a new one with `globe sweep`)",
                    where, model_name(source), UNKNOWN)
        return UNKNOWN
    mine, theirs = source.get("content_hash") or _source_hash(source, model), model.get("content_hash")
    if mine and theirs:
        same = mine == theirs
    else:
        same = bool(source.get("model_dir") and model.get("model_dir")) and \
            Path(source["model_dir"]).resolve() == Path(model["model_dir"]).resolve()
    if not same:
        raise ArtifactError(f"sweep {where} is of {model.get('model_dir') or model.get('name')}, not of the artifact's "
                            f"model {source.get('model_dir', '?')}: make one with `globe sweep "
                            f"{source.get('model_dir', 'MODEL_DIR')} -o SWEEP.json`, or drop --sweep")
    return ""


def _source_hash(source: dict, model: dict) -> str | None:
    """The content hash of the artifact's source checkpoint when the artifact records none (older artifacts) but
    the sweep has one and that checkpoint is still here; None otherwise."""
    model_dir = source.get("model_dir")
    if not model.get("content_hash") or not model_dir or not Path(model_dir).is_dir():
        return None
    try:
        with open_checkpoint(model_dir) as reader:
            return reader.content_hash()
    except GlobeError as exc:
        log.debug("no content hash of %s: %s", model_dir, exc)
        return None


def sweep_points(sweep: dict) -> dict[str, list[tuple[float, float]]]:
    """(params ratio, rel_err) per method of a sweep JSON: SVD, MoBE ("mobe"; older files "per_layer_bank"), and
    the best GloBE warm start of each budget."""
    series: dict[str, list[tuple[float, float]]] = {}
    for family, rows in sweep.get("families", {}).items():
        for row in rows:
            dense = row["dense_params"]
            for method, keys in (("svd", ("svd",)), ("MoBE", ("mobe", "per_layer_bank"))):
                found = next((row[k] for k in keys if row.get(k)), None)
                if found:
                    series.setdefault(f"{method} ({family})", []).append((found["params"] / dense, found["rel_err"]))
            if row.get("globe"):
                best = min(row["globe"], key=lambda g: g["rel_err"])
                series.setdefault(f"GloBE sweep ({family})", []).append((best["params"] / dense, best["rel_err"]))
    return {k: sorted(v) for k, v in series.items()}


def error_vs_budget_figure(result: FitResult | None, sweep: dict, label: str = ""):
    """Error vs stored / dense params of every method of the sweep, and the artifact's families as stars."""
    fig, ax = _figure()
    for name, pts in sweep_points(sweep).items():
        ax.plot(*zip(*pts), marker="o", linestyle="-" if "GloBE" in name else "--", label=name + label)
    for name, fam in (result.families if result else {}).items():
        params = fam.metrics.get("params", {})
        if params.get("dense"):
            ax.scatter([params["stored"] / params["dense"]], [fam.metrics["rel_err"]], marker="*", s=150, zorder=5,
                       label=f"this artifact ({name})")
    model = model_name(result.source) if result else (sweep_model(sweep) or {}).get("name", "unknown model")
    ax.set(xlabel="stored params / dense params", ylabel="relative Frobenius error",
           title=f"{model}{label}: error vs parameter budget ({', '.join(sweep.get('families', {}))})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


# ---- the artifact ----
def per_layer_figure(result: FitResult):
    fig, ax = _figure()
    for name, fam in result.families.items():
        per_layer = {int(k): v for k, v in fam.metrics.get("rel_err_per_layer", {}).items()}
        if per_layer:
            layers = sorted(per_layer)
            ax.plot(layers, [per_layer[l] for l in layers], marker="o", label=name)
    ax.set(xlabel="layer", ylabel="relative error", title=_title(result, "per-layer error"))
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def support_figure(result: FitResult):
    """Histogram of atoms per expert, integer ticks, the config's target support as a vertical line."""
    fig, ax = _figure()
    for name, fam in result.families.items():
        support = (fam.codes != 0).sum(-1).tolist()                          # atoms per expert
        ax.hist(support, bins=range(0, max(support) + 2), alpha=0.6, label=name, align="left")
    target = result.config.sparsity.target_support
    ax.axvline(target, color="black", linestyle="--", label=f"target support {target}")
    ax.set(xlabel="atoms per expert (support)", ylabel="experts", title=_title(result, "code support"))
    _integer_ticks(ax.xaxis, ax.yaxis)
    ax.legend()
    return fig


def popularity_figure(result: FitResult):
    fig, ax = _figure()
    for k, (name, fam) in enumerate(result.families.items()):
        popularity = sorted((fam.codes != 0).sum(0).tolist(), reverse=True)  # experts per atom
        ax.bar([i + 0.4 * k for i in range(len(popularity))], popularity, width=0.4, label=name)
    ax.set(xlabel="atom (sorted by popularity)", ylabel="experts using it", title=_title(result, "atom popularity"))
    _integer_ticks(ax.xaxis, ax.yaxis)
    ax.legend()
    return fig


def am_history_figure(result: FitResult):
    """Relative error, median support (the steered quantity, target dashed) and temperature per AM iteration."""
    fig, (err, supp, temp) = _figure(3, height=7, sharex=True)
    for name, fam in result.families.items():
        am = fam.history.get("am", [])
        steps = range(len(am))
        err.plot(steps, [row["rel_err"] for row in am], marker=".", label=name)
        supp.plot(steps, [row["median_support"] for row in am], marker=".", label=name)
        temp.plot(steps, [row["temperature"] for row in am], marker=".", label=name)
    target = result.config.sparsity.target_support
    supp.axhline(target, color="black", linestyle="--", label=f"target {target}")
    err.set(ylabel="relative error", title=_title(result, "alternating minimisation"))
    supp.set(ylabel="median support")
    temp.set(xlabel="AM iteration", ylabel="temperature T", yscale="log")
    _integer_ticks(temp.xaxis, supp.yaxis)
    for ax in (err, supp, temp):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def figures(result: FitResult | None, sweep: dict | None = None, sweep_name: str = "the sweep") -> dict:
    """{PNG file name: Figure} of an artifact and/or a sweep (see the module docstring); nothing is saved.
    Without a sweep there is no error_vs_budget figure (an INFO line says how to get one)."""
    figs = {}
    if sweep is not None:
        label = check_sweep_model(sweep, result.source, sweep_name) if result is not None else ""
        figs["error_vs_budget.png"] = error_vs_budget_figure(result, sweep, label)
    elif result is not None:
        log.info("no error_vs_budget.png: it needs a budget sweep of %s (`globe sweep %s -o SWEEP.json`, then "
                 "--sweep SWEEP.json)", model_name(result.source), result.source.get("model_dir", "MODEL_DIR"))
    if result is not None and result.families:
        figs.update({"per_layer_error.png": per_layer_figure(result), "support_hist.png": support_figure(result),
                     "atom_popularity.png": popularity_figure(result)})
        if any(f.history.get("am") for f in result.families.values()):
            figs["am_history.png"] = am_history_figure(result)
    return figs


# Every file write_plots may write (an existing one is replaced only with --overwrite: globe.run.evaluate.run_eval).
PLOT_FILES = ("error_vs_budget.png", "per_layer_error.png", "support_hist.png", "atom_popularity.png",
              "am_history.png")


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG atomically (temp file, fsync, rename)."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def write_plots(out_dir: str | Path, artifact=None, sweep: str | Path | dict | None = None) -> list[Path]:
    """Write the PNGs for an artifact (directory or FitResult) and/or a sweep JSON into out_dir; their paths."""
    if artifact is None and sweep is None:
        raise ArtifactError("nothing to plot: pass an artifact (--globe OUT) or a budget sweep (--sweep JSON)")
    _matplotlib()
    result = artifact if isinstance(artifact, FitResult) or artifact is None else load(artifact)
    where = str(sweep) if isinstance(sweep, (str, Path)) else "the sweep"
    figs = figures(result, read_sweep(sweep) if isinstance(sweep, (str, Path)) else sweep, where)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fig in figs.values():
        fig.tight_layout()
    atomic_write_all({out / name: (lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=110))
                      for name, fig in figs.items()})     # each in one rename; a failed write replaces none
    paths = [out / name for name in figs]
    log.info("plots written to %s: %s", out, ", ".join(p.name for p in paths))
    return paths
