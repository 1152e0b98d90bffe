"""Markdown tables of a benchmarks/peers.py JSON: one table per model, one row per (cut, method), KL to the original
first (the headline) with top-1 agreement beside it, params and the bytes the routed gate / up store, then each
GloBE row against the best peer (KL ratio, goal <= 0.5x; top-1 above every peer's) and the GloBE / MoBE ratios.
--summary prints one table over every model and cut instead: the best peer and each GloBE default row's KL ratio
to it, the goal met or missed by how much. With --globe-rows FILE2 [FILE3 ...] the tables take the peers' rows
from the first file and the GloBE rows from the others (reruns of GloBE methods alone, same settings: checked; each
method's row from the last file that has it; ratios recomputed), the summary's columns naming the file of their
rows, the top-1
margin over the best peer top-1 beside each GloBE row. A file given as FILE:LABEL shows its GloBE rows under the
method name LABEL (it must start with "globe" and the file must hold one GloBE method), so an older run of a
default (e.g. the 4-bit rows of `--total-cut C --bits 4`) stays visible beside a rerun under the same method name;
the summary then has a column per label, after globe-default-quant. The result files are never edited. The README's results section is pasted from this output. Files written before KL (or bytes) were measured show "-" in those columns.

    python benchmarks/peers_table.py benchmarks/results/peers_eval_models.json
    python benchmarks/peers_table.py --summary benchmarks/results/peers_grid.json
    python benchmarks/peers_table.py --summary benchmarks/results/peers_grid.json \
        --globe-rows benchmarks/results/peers_grid_globe.json
    python benchmarks/peers_table.py benchmarks/results/peers_grid.json \
        --globe-rows benchmarks/results/peers_grid_globe.json benchmarks/results/peers_grid_globe_quant.json
    python benchmarks/peers_table.py --summary benchmarks/results/peers_grid.json \
        --globe-rows benchmarks/results/peers_grid_globe.json \
        benchmarks/results/peers_grid_globe_quant.json:globe-default-bits4 benchmarks/results/peers_grid_globe_p8.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("svd", "svd-llm", "d2moe", "d2moe-llm", "d2moe-sharev", "mobe", "mobe-best", "reap", "hc-smoe", "globe",
         "globe-nonlinear", "globe-aware", "globe-default", "globe-default-text", "globe-default-quant",
         "globe-default-bits4")
GOAL = 0.5                                                  # GloBE's KL over the best peer's, at most
# peers.py settings that change a row: two files are merged only where they agree on each
ROW_SETTINGS = ("calib_tokens", "output_tokens", "fisher_batches", "ppl_tokens", "window", "default_calib_tokens",
                "text", "calib", "globe_am_iters", "globe_varpro_steps")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def goal(ratio: float | None) -> str:
    """"met" or how far a KL ratio to the best peer is from the goal."""
    if ratio is None:
        return "-"
    return "met" if ratio <= GOAL else f"missed by {ratio / GOAL:.2f}x"


def _mb(row: dict) -> str:
    return "-" if "bytes" not in row else f"{sum(row['bytes'].values()) / 1e6:.3f}"


def model_table(model: dict) -> list[str]:
    """Rows: cut, method, KL, top-1, gate / up weight error, routed output error, perplexity (+ increase), fit s,
    params per family (of dense), the bytes gate + up store, total params of the whole model (where the file has
    them)."""
    info = model["model"]
    lines = [f"**{Path(info['dir']).name}** ({info['layers']} layers x {info['experts']} experts, p={info['p']}, "
             f"d={info['d']}; original perplexity {info['original_perplexity']:.3f} on {info['heldout_tokens']:,} "
             "held-out tokens)", "",
             "| cut (budget/family) | method | KL (nats/token) | top-1 agreement | weight error gate / up | "
             "output error | perplexity (increase) | fit s | params/family | gate+up MB | total params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cut in sorted(model["cuts"], key=lambda c: c["cut"]):
        rows = {r["method"]: r for r in cut["rows"]}
        for name in [m for m in ORDER if m in rows] + [m for m in rows if m not in ORDER]:    # relabelled last
            r = rows[name]
            lines.append(f"| -{100 * cut['cut']:.0f} % ({cut['budget_per_family']:.3f}) | {name} | "
                         f"{_num(r.get('kl'), '.5f')} | {_num(r.get('top1'), '.4f')} | "
                         f"{r['rel_err']['gate']:.3f} / {r['rel_err']['up']:.3f} | {r['output_rel_err']['rel_err']:.4f} | "
                         f"{r['perplexity']:.3f} (+{r['delta_ppl']:.3f}) | {r['fit_seconds']:.0f} | "
                         f"{_num(r.get('params_ratio', {}).get('gate'), '.3f')} | {_mb(r)} | "
                         f"{_num(r.get('total_params'), ',')} |")
    cut_ratios = {cut["cut"]: cut["ratios"] if "ratios" in cut else _ratios(cut["rows"]) for cut in model["cuts"]}
    best = [(cut, key, r) for cut in sorted(model["cuts"], key=lambda c: c["cut"])
            for key, r in cut_ratios[cut["cut"]].items() if key.endswith("/best-peer")]
    if best:
        lines += ["", "| cut | GloBE row | KL / best peer's KL (goal <= 0.5) | best peer (its KL) | top-1 (best peer's) | "
                  "peers with top-1 >= GloBE's |", "|---|---|---|---|---|---|"]
        lines += [f"| -{100 * cut['cut']:.0f} % | {key.split('/')[0]} | {_num(r['kl'], '.2f')} | "
                  f"{r['best_peer']} ({r['peer_kl']:.5f}) | {r['top1']:.4f} ({r['best_peer_top1']:.4f}) | "
                  f"{', '.join(r['top1_not_above']) or 'none'} |" for cut, key, r in best]
    lines += ["", "| cut | ratio to MoBE (defaults) | KL | weight gate | weight up | output error | "
              "perplexity increase |",
              "|---|---|---|---|---|---|---|"]
    for cut in sorted(model["cuts"], key=lambda c: c["cut"]):
        for key, ratio in cut_ratios[cut["cut"]].items():
            if key.endswith("/mobe"):
                dppl = "n/a" if ratio["delta_ppl"] is None else f"{ratio['delta_ppl']:.2f}"
                lines.append(f"| -{100 * cut['cut']:.0f} % | {key.split('/')[0]} | {_num(ratio.get('kl'), '.2f')} | "
                             f"{ratio['gate']:.3f} | {ratio['up']:.3f} | {ratio['output']:.2f} | {dppl} |")
    return lines


def _ratios(rows: list[dict]) -> dict:
    """benchmarks.peers.ratios of merged rows (imported here: peers.py loads torch and the baselines)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.peers import ratios
    return ratios(rows)


def _is_globe(row: dict) -> bool:
    return row["method"].startswith("globe")


def split_spec(spec: str) -> tuple[str, str | None]:
    """"FILE" -> (FILE, None); "FILE:LABEL" -> (FILE, LABEL): LABEL must name a GloBE row ("globe..."), one word."""
    path, sep, label = spec.rpartition(":")
    if not sep or "/" in label or not label:
        return spec, None
    if not label.startswith("globe") or any(c.isspace() for c in label):
        raise SystemExit(f"--globe-rows {spec}: the label {label!r} must start with 'globe' (a GloBE row), no spaces")
    return path, label


def relabel(report: dict, label: str, name: str = "FILE") -> dict:
    """A copy of a peers.py report whose one GloBE method is named `label` (its peers' rows and stored ratios
    dropped: merge() takes only GloBE rows and recomputes the ratios); SystemExit naming the methods where the file
    holds more than one GloBE method or none."""
    methods = sorted({r["method"] for m in report["models"] for c in m["cuts"] for r in c["rows"] if _is_globe(r)})
    if len(methods) != 1:
        raise SystemExit(f"--globe-rows {name}:{label}: a label needs one GloBE method in the file, it has "
                         f"{', '.join(methods) or 'none'}")
    models = [{**m, "cuts": [{**{k: v for k, v in c.items() if k not in ("rows", "ratios")},
                              "rows": [{**r, "method": label} for r in c["rows"] if _is_globe(r)]}
                             for c in m["cuts"]]} for m in report["models"]]
    return {**report, "models": models}


def merge(peers_report: dict, *globe_reports: dict) -> dict:
    """The peers' rows of `peers_report` with the GloBE rows of `globe_reports`, per (model, cut) of the first: each
    GloBE method's row from the last of those files that has it (a later rerun of one method overrides it);
    SystemExit naming the setting or model where two runs differ in what changes a row."""
    a = peers_report.get("settings", {})
    for globe_report in globe_reports:
        b = globe_report.get("settings", {})
        differ = [k for k in ROW_SETTINGS if a.get(k) != b.get(k)]
        if differ:
            raise SystemExit("the two files were run with different settings: " +
                             ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ))
    models = []
    for model in peers_report["models"]:
        name = Path(model["model"]["dir"]).name
        globe_rows: dict[float, dict[str, dict]] = {}                  # cut -> method -> row (the last file's)
        for globe_report in globe_reports:
            other = next((m for m in globe_report["models"] if Path(m["model"]["dir"]).name == name), None)
            if other is None:
                continue
            for key in ("heldout_tokens", "original_perplexity"):
                if model["model"].get(key) != other["model"].get(key):
                    raise SystemExit(f"{name}: {key} differs between the two files ({model['model'].get(key)} vs "
                                     f"{other['model'].get(key)})")
            for cut in other["cuts"]:
                globe_rows.setdefault(cut["cut"], {}).update({r["method"]: r for r in cut["rows"] if _is_globe(r)})
        cuts = [{**{k: v for k, v in cut.items() if k != "ratios"},     # the first run's ratios are stale
                 "rows": [r for r in cut["rows"] if not _is_globe(r)] + list(globe_rows.get(cut["cut"], {}).values())}
                for cut in model["cuts"]]
        models.append({**model, "cuts": cuts})
    return {"models": models}


def summary_table(report: dict, rows: tuple[str, ...] = ("globe-default-quant", "globe-default"),
                  sources: tuple[str, str] | None = None) -> list[str]:
    """One row per (model, cut): the best peer (lowest KL of the non-GloBE rows) with its KL, top-1 and gate+up
    bytes, then per GloBE row in `rows` its KL, KL / best peer's (goal <= 0.5: met or missed by how much), top-1
    and bytes. sources: the files the peers' and the GloBE rows came from (merge()); the headers name them and
    each GloBE top-1 gets its margin over the best peer top-1."""
    peer_from = f" ({sources[0]})" if sources else ""

    def globe_from(g: str) -> str:          # sources[1]: one name for every GloBE row, or {method: its file}
        if not sources:
            return ""
        return f" ({sources[1].get(g, '-')})" if isinstance(sources[1], dict) else f" ({sources[1]})"
    cols = "".join(f" {g}{globe_from(g)}: KL (x best peer, goal) | top-1 | MB |" for g in rows)
    lines = [f"| model | cut | best peer{peer_from}: KL | top-1 | MB |{cols}",
             "|---|---|---|---|---|" + "---|---|---|" * len(rows)]
    for model in report["models"]:
        name = Path(model["model"]["dir"]).name
        for cut in sorted(model["cuts"], key=lambda c: c["cut"]):
            by = {r["method"]: r for r in cut["rows"]}
            peers = [r for r in cut["rows"] if not r["method"].startswith("globe")]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["kl"])
            line = (f"| {name} | -{100 * cut['cut']:.0f} % | {best['method']}: {best['kl']:.5f} | {best['top1']:.4f} | "
                    f"{_mb(best)} |")
            for g in rows:
                if g not in by:
                    line += " - | - | - |"
                    continue
                ratio = by[g]["kl"] / best["kl"] if best["kl"] else None
                above = all(by[g]["top1"] > r["top1"] for r in peers)
                margin = f" ({by[g]['top1'] - max(r['top1'] for r in peers):+.4f})" if sources else ""
                line += (f" {by[g]['kl']:.5f} ({_num(ratio, '.2f')}x, {goal(ratio)}) | {by[g]['top1']:.4f}{margin}"
                         f"{'' if above else ' (not above every peer)'} | {_mb(by[g])} |")
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a benchmarks/peers.py output file")
    p.add_argument("--summary", action="store_true", help="one table over every model and cut (see summary_table)")
    p.add_argument("--globe-rows", metavar="FILE2[:LABEL]", nargs="+", help="the GloBE rows from these files "
                   "(reruns of GloBE methods alone; a method's row from the last file that has it), the peers' from "
                   "the first (ratios recomputed); FILE:LABEL shows that file's one GloBE method as LABEL")
    args = p.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    sources, rows = None, ("globe-default-quant", "globe-default")
    if args.globe_rows:
        specs = [split_spec(s) for s in args.globe_rows]
        reports = [json.loads(Path(f).read_text()) for f, _ in specs]
        reports = [relabel(r, label, f) if label else r for r, (f, label) in zip(reports, specs)]
        report = merge(report, *reports)
        origin = {r["method"]: Path(f).name for rep, (f, _) in zip(reports, specs)       # the last file's row
                  for m in rep["models"] for c in m["cuts"] for r in c["rows"] if _is_globe(r)}
        sources = (Path(args.json).name, origin)
        labels = tuple(label for _, label in specs if label and label not in rows)
        rows = (rows[0], *labels, *rows[1:])
    if args.summary:
        print("\n".join(summary_table(report, rows=rows, sources=sources)) + "\n")
        return
    for model in report["models"]:
        print("\n".join(model_table(model)) + "\n")


if __name__ == "__main__":
    main()
