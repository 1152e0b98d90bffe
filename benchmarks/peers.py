"""Peer comparison at equal stored parameters: GloBE against MoBE, D2-MoE, per-expert SVD, SVD-LLM, REAP, HC-SMoE.

For each model directory (default: the embedded model) and each cut of the model's TOTAL parameters (default 25,
35, 40 %; the per-family gate/up budget comes from globe's `total_cut_budget`), every selected method compresses
the routed experts' gate and up projections to the same stored-parameter budget per family, and each result is
written as a dense Hugging Face checkpoint, reloaded with stock `AutoModelForCausalLM.from_pretrained` and scored:
  KL                KL(original || compressed) per held-out token, nats (globe.eval.divergence): the headline
  top-1             how often the compressed model's most likely next token is the original's
  weight error      relative Frobenius error per family (of the reloaded, dtype-rounded weights)
  output error      relative error of the routed experts' summed, routing-weighted output on calibration tokens
                    that no method fitted on (benchmarks/baselines/routed.py)
  perplexity        non-overlapping windows over the held-out text (the windows KL and top-1 are measured on)
  fit time          seconds of the method's own fit (shared statistics, Fisher information: reported once)
Methods (--methods): svd, svd-llm (whitened, per-expert routed Grams), d2moe, d2moe-llm, d2moe-sharev (whitened
share_V), mobe (its defaults), mobe-sweep (a small sweep of m / act / lr / epochs scored by weight error; its best
config gets the full evaluation), reap (REAP expert pruning: the least salient experts and their router rows
removed, a smaller checkpoint), hc-smoe (HC-SMoE: experts clustered by output, average linkage, merged by
frequency; router kept), globe-default-quant (exactly what `globe compress MODEL --total-cut C` runs: calibrated
on 8192 tokens the model samples itself, activation-aware fit, the whole-expert phase (200 steps), factors
quantized as the command's default does: 8-bit group 64 at a parameter target, 4-bit before), globe-default-bits4
(the same with --bits 4: what globe-default-quant ran before 8 bits became the default),
globe-default (the same with --no-quant: the factors in the model's dtype), globe-default-text (globe-default with
--calibration-text MODEL/calib.txt); the four go through the `globe compress` parser and its config, their fit
time includes calibration and both exports; globe (weight-space fit), globe-nonlinear
(weight space, the block SVD start + full-batch tanh refinement of globe.fit.solvers.nonlinear,
FitConfig.nonlinear.enabled), globe-aware (activation-aware, default settings). reap and hc-smoe remove or merge
whole experts (gate, up AND down), so they keep the largest expert count
whose TOTAL parameters do not exceed what the compressing methods store at the cut; their `params` per family is
that equal-total allowance in gate/up terms (their stored expert and router params minus the dense down and
router the others keep, halved), `total_params` is every row's whole model, and their weight and output errors
are measured with a dropped expert as zero (REAP) under the original routing.
Bytes, next to params in every row: `bytes` per family is what the routed experts' gate / up store (the peers'
dense bf16 checkpoints: the model's bytes per value x params; REAP and HC-SMoE: of their gate/up allowance;
GloBE: the artifact's stored parts, packed quantized factors included, by globe.fit.engine.quantize.stored_bytes),
`total_bytes` every tensor of the whole checkpoint (the source's bytes minus what the row removes). At equal
params a quantized row takes fewer bytes: the table shows the KL at equal params and the bytes each takes.
Texts: --text / --calib, else MODEL/heldout.txt and MODEL/calib.txt, else (embedded model)
corpus/train.txt as benchmarks/activation_aware.py uses (rebuild with scripts/build_corpus.py). Calibration
statistics come from `globe.calibration.collect_stats` (what `globe calibrate` writes) on the first
--calib-tokens tokens; the output error uses the next --output-tokens tokens. One JSON: --out.

    python benchmarks/peers.py                                       # embedded model, all methods, three cuts
    python benchmarks/peers.py benchmarks/models/X --cuts 0.35 --methods svd mobe globe

With several models and one job, every model is prepared first and the cuts run in the order given, each over
every model (the JSON is saved after each), so a run stopped early holds the first cuts of every model.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                                           # benchmarks.baselines from a checkout

from benchmarks.baselines import rel_err                                 # noqa: E402
from benchmarks.baselines.checkpoint import FAMILIES, load_causal_lm, read_families, write_dense  # noqa: E402
from benchmarks.baselines.d2moe import d2moe                             # noqa: E402
from benchmarks.baselines.fisher import expert_fisher                    # noqa: E402
from benchmarks.baselines.hcsmoe import clusters_for_budget, hc_smoe, merged_params  # noqa: E402
from benchmarks.baselines.mobe import MobeConfig, fit_mobe               # noqa: E402
from benchmarks.baselines.reap import kept_for_budget, pruned_params, reap_keep, write_pruned  # noqa: E402
from benchmarks.baselines.routed import capture_routed, output_error     # noqa: E402
from benchmarks.baselines.svd import per_expert_svd, whitened_svd        # noqa: E402

log = logging.getLogger("benchmarks.peers")
METHODS = ("svd", "svd-llm", "d2moe", "d2moe-llm", "d2moe-sharev", "mobe", "mobe-sweep", "reap", "hc-smoe", "globe",
           "globe-aware", "globe-nonlinear", "globe-default", "globe-default-text", "globe-default-quant",
           "globe-default-bits4")
# run as `globe compress MODEL --total-cut C` + these options (its parser, its config, globe.run.compress)
GLOBE_DEFAULTS = {"globe-default-quant": (), "globe-default": ("--no-quant",),
                  "globe-default-text": ("--no-quant", "--calibration-text"), "globe-default-bits4": ("--bits", "4")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from globe.assets import DEFAULT_MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(DEFAULT_MODEL_DIR)], help="model directories (default: the embedded model)")
    a("--cuts", type=float, nargs="+", default=[0.25, 0.35, 0.40], help="cuts of TOTAL params (default 25 35 40 %%)")
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run (default: all)")
    a("--text", help="held-out text for perplexity (default MODEL/heldout.txt)")
    a("--calib", help="calibration text (default MODEL/calib.txt, or corpus/train.txt for the embedded model)")
    a("--calib-tokens", type=int, default=32768, help="calibration tokens for statistics and Fisher (default 32768)")
    a("--output-tokens", type=int, default=4096, help="further calibration tokens for the output error")
    a("--fisher-batches", type=int, default=32, help="windows for D2-MoE's Fisher information (default 32)")
    a("--ppl-tokens", type=int, default=16384, help="score the first N held-out tokens (0: all; default 16384)")
    a("--window", type=int, default=256, help="window of calibration and perplexity (default 256)")
    a("--mobe-epochs", type=int, default=500, help="MoBE Adam epochs (default 500; the original: 10000-30000 on GPUs)")
    a("--mobe-sweep", nargs="*", default=["m=E/8", "lr=0.02"],
      help="MoBE sweep configs, each key=value[,key=value] over m (a number or E/k), act, lr, epochs")
    a("--stats-dir", default=str(REPO / "runs" / "peers"), help="calibration statistics files (reused)")
    a("--globe-am-iters", type=int, help="GloBE AM iterations (default: FitConfig's; for short runs)")
    a("--globe-varpro-steps", type=int, help="GloBE VarPro evaluations (default: FitConfig's; for short runs)")
    a("--default-calib-tokens", type=int, default=8192,
      help="globe-default*: calibration tokens, as `globe compress --calibration-tokens` (default 8192, its default)")
    a("--jobs", type=int, default=1, help="worker processes, one cut each (one torch thread each; default 1)")
    a("--passes", nargs="+", metavar="M1,M2,...",
      help="with one job: run the methods in passes, each pass (comma-separated methods) at every cut over every "
           "model before the next pass starts, so a run stopped early covers every cut with the first passes "
           "(default: one pass of --methods); --methods becomes their union")
    a("--out", default=str(REPO / "benchmarks" / "results" / "peers.json"), help="JSON output path")
    return p.parse_args(argv)


def sweep_configs(specs: list[str], experts: int, epochs: int) -> list[MobeConfig]:
    """MobeConfig per spec ('m=E/8,act=tanh'), on top of the defaults; the default config comes first."""
    out = [MobeConfig(epochs=epochs)]
    for spec in specs:
        kw = dict(item.split("=", 1) for item in spec.split(","))
        m = kw.get("m")
        m = (experts // int(m[2:]) if m.startswith("E/") else int(m)) if m else None
        cfg = MobeConfig(m=m, act=kw.get("act", "silu"), lr=float(kw.get("lr", 0.07)),
                         epochs=int(kw.get("epochs", epochs)))
        if cfg not in out and (cfg.m is None or experts % cfg.m == 0):
            out.append(cfg)
    return out


def texts(model_dir: Path, args) -> tuple[Path, Path]:
    from globe.assets import DEFAULT_MODEL_DIR
    heldout = Path(args.text) if args.text else model_dir / "heldout.txt"
    if args.calib:
        calib = Path(args.calib)
    elif (model_dir / "calib.txt").is_file():
        calib = model_dir / "calib.txt"
    else:
        calib = REPO / "corpus" / "train.txt" if model_dir.resolve() == Path(DEFAULT_MODEL_DIR).resolve() else \
            model_dir / "calib.txt"
    for path in (heldout, calib):
        if not path.is_file():
            raise SystemExit(f"peers.py: error: {path} not found (pass --text/--calib; the embedded model's "
                             f"calibration text is rebuilt by scripts/build_corpus.py)")
    return heldout, calib


def prepare(model_dir: Path, args) -> dict:
    """Everything the methods and the scoring share: weights, statistics, Fisher, routed tokens, texts."""
    import transformers
    from globe.calibration import collect_stats, load_stats, save_stats
    from globe.eval import encode_text, perplexity
    from globe.io import open_checkpoint
    from globe.fit.planning.bytes import source_bytes, value_bytes_of
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
        other_bytes, dense_bytes = source_bytes(reader, FAMILIES)
    heldout, calib = texts(model_dir, args)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    need = args.calib_tokens + args.output_tokens
    calib_ids = encode_text(tok, calib.read_text(encoding="utf-8")[:12 * need])[:need]
    if calib_ids.numel() < need:
        raise SystemExit(f"peers.py: error: {calib} has {calib_ids.numel()} tokens, need {need}")
    ppl_ids = encode_text(tok, heldout.read_text(encoding="utf-8"))
    ppl_ids = ppl_ids[:args.ppl_tokens] if args.ppl_tokens else ppl_ids
    model = load_causal_lm(model_dir)
    t0 = time.perf_counter()
    stats_path = Path(args.stats_dir) / f"{model_dir.name}_{calib.stem}_{args.calib_tokens}.safetensors"
    if not stats_path.is_file():
        stats = collect_stats(model, calib_ids[:args.calib_tokens], window=args.window, info={"text": str(calib)})
        save_stats(stats, stats_path)
    stats = load_stats(stats_path)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fisher = expert_fisher(load_causal_lm(model_dir, torch.float32), calib_ids[:args.calib_tokens], args.window,
                           args.fisher_batches) if {"d2moe", "d2moe-llm", "d2moe-sharev"} & set(args.methods) else None
    fisher_s = time.perf_counter() - t0
    captured, act = capture_routed(model, calib_ids[args.calib_tokens:], args.window)
    calib_routed = capture_routed(model, calib_ids[:args.calib_tokens], args.window)[0] \
        if {"reap", "hc-smoe"} & set(args.methods) else None
    original_ppl = perplexity(model, ppl_ids, args.window)["perplexity"]
    log.info("%s: original perplexity %.4f; statistics %.0f s, Fisher %.0f s", model_dir, original_ppl, calib_s,
             fisher_s)
    return {"dir": model_dir, "inv": inv, "window": args.window, "calib_path": calib,
            "default_calib_tokens": args.default_calib_tokens, "globe_am_iters": args.globe_am_iters,
            "globe_varpro_steps": args.globe_varpro_steps, "weights": read_families(model), "stats_path": str(stats_path),
            "grams": stats.hidden_expert, "freq": stats.counts.double(), "fisher": fisher, "captured": captured,
            "calib_routed": calib_routed,                   # reap / hc-smoe: the calibration tokens' routing
            "act": act, "ppl_ids": ppl_ids, "original_ppl": original_ppl, "original": model,
            "info": {"dir": str(model_dir), "model_type": inv.model_type, "total_params": inv.total_params,
                     "layers": len(inv.moe_layers), "experts": inv.num_experts, "p": inv.p, "d": inv.d,
                     "heldout": str(heldout), "heldout_tokens": int(ppl_ids.numel()), "calib": str(calib),
                     "calib_tokens": args.calib_tokens, "output_tokens": args.output_tokens,
                     "stats": str(stats_path), "calibration_seconds": round(calib_s, 1),
                     "fisher_seconds": round(fisher_s, 1), "fisher_batches": args.fisher_batches,
                     "original_perplexity": original_ppl,
                     "bytes": other_bytes + sum(dense_bytes.values()), "dtype": inv.dtype,
                     "value_bytes": value_bytes_of(inv.dtype), "dense_bytes": dense_bytes}}


def baseline(method: str, ctx: dict, budget: float, mobe_cfg: MobeConfig | None = None) -> dict:
    """{family: PeerFit} of one baseline method at `budget` per family."""
    fits = {}
    for family in FAMILIES:
        w, fisher = ctx["weights"][family], ctx["fisher"]
        f = None if fisher is None else fisher[family]
        fits[family] = {
            "svd": lambda: per_expert_svd(w, budget),
            "svd-llm": lambda: whitened_svd(w, ctx["grams"], budget),
            "d2moe": lambda: d2moe(w, budget, ctx["freq"], f),
            "d2moe-llm": lambda: d2moe(w, budget, ctx["freq"], f, grams=ctx["grams"]),
            "d2moe-sharev": lambda: d2moe(w, budget, ctx["freq"], f, grams=ctx["grams"], share_v=True),
            "mobe": lambda: fit_mobe(w, budget, mobe_cfg or MobeConfig()),
        }[method]()
    return fits


def expert_fit(method: str, ctx: dict, budget: float, out_dir: str) -> dict:
    """REAP or HC-SMoE at the equal-total allowance of `budget`: writes its checkpoint to out_dir; returns
    {"params" (gate/up-equivalent per family), "total", "info", "recon" (families for the weight/output errors)}."""
    w, inv = ctx["weights"], ctx["inv"]
    layers, e, p, d = w["gate"].shape
    routed = ctx["calib_routed"]
    if method == "reap":
        k = kept_for_budget(e, p, d, budget, router_row=d)
        keep, sal = reap_keep(w, ctx["act"], routed, k)
        write_pruned(ctx["dir"], keep, out_dir)
        stored = pruned_params(layers, k, p, d, router_row=d)
        mask = torch.zeros(layers, e, dtype=torch.bool).scatter_(1, keep, True)
        recon = {f: t * mask.view(layers, e, 1, 1) for f, t in w.items()}
        info = {"experts_kept": k, "kept": keep.tolist(), "saliency": sal.tolist(), "router": "rows removed"}
    else:
        k = clusters_for_budget(e, p, d, budget)
        freq = torch.stack([torch.bincount(r.index.reshape(-1), minlength=e) for r in routed]).double()
        recon, labels = hc_smoe(w, ctx["act"], [r.hidden for r in routed], freq, k)
        write_dense(ctx["dir"], recon, out_dir)
        stored = merged_params(layers, k, e, p, d)
        info = {"clusters": k, "labels": labels.tolist(), "router": "kept, members share the merged expert"}
    keeps = layers * e * (p * d + d)                          # dense down + router, as the compressing methods keep
    family = (stored - keeps) // 2
    total = inv.total_params - layers * e * (3 * p * d + d) + stored
    return {"params": {"gate": family, "up": family}, "total": total, "info": {"gate": info, "up": info},
            "recon": recon if method == "reap" else None}             # HC-SMoE: read back from its checkpoint


def globe_fit(method: str, ctx: dict, budget: float, support: int):
    """GloBE's default fit (weight space, or activation-aware from the calibration statistics) at `budget`."""
    import globe
    from globe.fit.config import ActivationConfig, BankConfig, NonlinearConfig, SparsityConfig, TrainConfig
    steps = {} if ctx["globe_varpro_steps"] is None else {"steps": ctx["globe_varpro_steps"]}
    activation = ActivationConfig(stats=ctx["stats_path"], **steps) if method == "globe-aware" else ActivationConfig()
    train = {k: v for k, v in (("am_iters", ctx["globe_am_iters"]), ("varpro_steps", ctx["globe_varpro_steps"]))
             if v is not None}
    cfg = globe.FitConfig(bank=BankConfig(budget=budget, families=FAMILIES),
                          sparsity=SparsityConfig(target_support=support), train=TrainConfig(**train),
                          activation=activation, nonlinear=NonlinearConfig(enabled=method == "globe-nonlinear"))
    return globe.fit_model(ctx["dir"], cfg)


def compress_args(method: str, ctx: dict, cut: float, work: Path):
    """(argv, parsed namespace) of `globe compress MODEL -o work/compressed --total-cut CUT --dense` +
    GLOBE_DEFAULTS[method], by the command's own parser."""
    from globe.cli.main import build_parser
    argv = ["compress", str(ctx["dir"]), "-o", str(work / "compressed"), "--total-cut", str(cut), "--dense",
            "--dense-out", str(work / "dense"), "--overwrite", "--device", "cpu",
            "--calibration-tokens", str(ctx["default_calib_tokens"])]
    for option in GLOBE_DEFAULTS[method]:
        argv += [option, str(ctx["calib_path"])] if option == "--calibration-text" else [option]
    for flag, key in (("--am-iters", "globe_am_iters"), ("--varpro-steps", "globe_varpro_steps")):
        if ctx[key] is not None:                                # only the short runs of tests change the defaults
            argv += [flag, str(ctx[key])]
    return argv, build_parser().parse_args(argv)


def globe_compress(method: str, ctx: dict, cut: float, work: Path):
    """`globe compress MODEL -o work/compressed --total-cut CUT --dense` + GLOBE_DEFAULTS[method], parsed by the
    command's own parser into the command's own config (globe.cli.compress), run by globe.run.compress as the
    command runs it; returns (FitResult, dense checkpoint)."""
    from globe.cli import compress as cli
    from globe.run.compress import run_compress
    argv, args = compress_args(method, ctx, cut, work)
    cfg, plans = cli._config_plans(args)
    run = cli.compress_run(args, cfg, plans, "globe " + " ".join(argv))
    done = run_compress(run)
    log.info("%s: %s", method, cli.bytes_line(done["result"]))
    return done["result"], Path(done["dense"])


def score(ctx: dict, checkpoint: Path, recon: dict | None = None) -> dict:
    """KL and top-1 agreement to the original, weight error, output error and perplexity of a checkpoint,
    reloaded with stock transformers (weight and output errors of `recon` where given, else of its experts)."""
    from globe.eval import divergence
    model = load_causal_lm(checkpoint)
    recon = read_families(model) if recon is None else recon
    div = divergence(ctx["original"], model, ctx["ppl_ids"], ctx["window"])
    return {"kl": div["kl"], "top1": div["top1"],
            "rel_err": {f: rel_err(ctx["weights"][f], recon[f]) for f in FAMILIES},
            "output_rel_err": output_error(ctx["weights"], recon, ctx["act"], ctx["captured"]),
            "perplexity": div["perplexity"]}


def run_method(method: str, ctx: dict, budget: float, support: int, fits: dict | None = None,
               seconds: float | None = None) -> dict:
    """Fit one method (or take the given baseline fits), write its dense checkpoint, score it; one JSON row."""
    import globe
    from globe.fit.planning.bytes import result_bytes
    dense = ctx["weights"]["gate"].numel()
    t0 = time.perf_counter()
    recon = total = stored = None
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        scored = Path(tmp)
        if method in GLOBE_DEFAULTS:
            result, scored = globe_compress(method, ctx, ctx["cut"], Path(tmp))
            seconds = time.perf_counter() - t0
            params = {f: int(result.params[f]) for f in FAMILIES}
            info = {f: {"m": fam.shape["m"], "r": fam.shape["r"], "median_support": fam.metrics.get("median_support")}
                    for f, fam in result.families.items()}
            info["calibration"] = result.source.get("calibration")
            info["quant"] = {f: {k: f"{q.bits}-bit, groups of {q.group}" for k, q in fam.quant.items()} or None
                             for f, fam in result.families.items()}              # None: in the model's dtype
            stored = result_bytes(result)
        elif method.startswith("globe"):
            result = globe_fit(method, ctx, budget, support)
            seconds = time.perf_counter() - t0
            globe.export_dense(ctx["dir"], result, tmp)
            stored = result_bytes(result)
            params = {f: int(result.params[f]) for f in FAMILIES}
            info = {f: {"m": fam.shape["m"], "r": fam.shape["r"], "median_support": fam.metrics.get("median_support")}
                    for f, fam in result.families.items()}
        elif method in ("reap", "hc-smoe"):
            fit = expert_fit(method, ctx, budget, tmp)
            seconds = time.perf_counter() - t0
            params, info, recon, total = fit["params"], fit["info"], fit["recon"], fit["total"]
        else:
            if fits is None:
                fits = baseline(method, ctx, budget)
                seconds = time.perf_counter() - t0
            write_dense(ctx["dir"], {f: fit.weights for f, fit in fits.items()}, tmp)
            params = {f: fit.params for f, fit in fits.items()}
            info = {f: fit.info for f, fit in fits.items()}
        if total is None:
            total = ctx["inv"].total_params - 2 * dense + sum(params[f] for f in FAMILIES)
        row = {"method": method, "fit_seconds": round(seconds, 1), "params": params,
               "params_ratio": {f: params[f] / dense for f in FAMILIES}, "total_params": int(total),
               **row_bytes(ctx, params, int(total), stored), "shape": info, **score(ctx, scored, recon)}
    row["delta_ppl"] = row["perplexity"] - ctx["original_ppl"]
    log.info("%s -%.0f%% %s: KL %.5f, top-1 %.4f, rel_err %s, output %.4f, ppl %.3f, gate+up %d bytes, fit %.0f s",
             ctx["dir"].name, 100 * ctx["cut"], method, row["kl"], row["top1"],
             " / ".join(f"{row['rel_err'][f]:.4f}" for f in FAMILIES), row["output_rel_err"]["rel_err"],
             row["perplexity"], sum(row["bytes"].values()), seconds)
    return row


def row_bytes(ctx: dict, params: dict, total: int, stored: dict | None) -> dict:
    """{"bytes": {family: stored bytes of its routed gate / up}, "total_bytes": every tensor of the checkpoint}:
    a GloBE row's from its FitResult (`stored`, globe.fit.planning.bytes.result_bytes); a peer's at the model's
    bytes per value (its dense checkpoint's dtype), the whole model's bytes less what its params remove."""
    info = ctx["info"]
    if stored is not None:
        return {"bytes": {f: int(stored["families"][f]["stored"]) for f in FAMILIES},
                "total_bytes": int(stored["after"])}
    width = info["value_bytes"]
    return {"bytes": {f: int(params[f]) * width for f in FAMILIES},
            "total_bytes": int(info["bytes"] - width * (info["total_params"] - total))}


def mobe_fits(ctx: dict, budget: float, configs: list[MobeConfig]) -> list[dict]:
    """MoBE fits of every config (the first is the defaults), with their weight errors and fit times."""
    out = []
    for cfg in configs:
        t0 = time.perf_counter()
        fits = baseline("mobe", ctx, budget, cfg)
        errs = {f: rel_err(ctx["weights"][f], fit.weights) for f, fit in fits.items()}
        out.append({"cfg": cfg, "fits": fits, "rel_err": errs, "seconds": time.perf_counter() - t0})
        log.info("-%.0f%% MoBE %s: r=%d, %s", 100 * ctx["cut"], cfg, fits["gate"].info["r"], errs)
    return out


def run_cut(ctx: dict, cut: float, args, on_row=None, methods: list[str] | None = None,
            out: dict | None = None) -> dict:
    """Every method of `methods` (default --methods) at one total cut, in that order, its rows appended to `out`
    (a cut's dict from an earlier pass; default a new one). MoBE: the sweep's configs are fitted once; `mobe` is
    the default config, `mobe-best` the config with the lowest summed squared weight error (MoBE's own objective).
    on_row(cut so far) after each row: a run stopped early keeps every finished row."""
    from globe.fit.solvers.budget import total_cut_budget
    methods = list(args.methods if methods is None else methods)
    budget, support = total_cut_budget(cut, ctx["inv"], FAMILIES)
    ctx["cut"] = cut
    t0 = time.perf_counter()
    out = {"cut": cut, "budget_per_family": budget, "globe_target_support": support, "rows": [], "seconds": 0.0} \
        if out is None else out
    sweep = []
    if {"mobe", "mobe-sweep"} & set(methods):
        configs = sweep_configs(args.mobe_sweep if "mobe-sweep" in methods else [], ctx["inv"].num_experts,
                                args.mobe_epochs)
        sweep = mobe_fits(ctx, budget, configs)
        out["mobe_sweep"] = [{"config": {**vars(s["cfg"]), "m": s["fits"]["gate"].info["m"]},
                              "r": s["fits"]["gate"].info["r"], "rel_err": s["rel_err"],
                              "params": {f: fit.params for f, fit in s["fits"].items()},
                              "fit_seconds": round(s["seconds"], 1)} for s in sweep]
    for method in methods:
        if method in ("mobe", "mobe-sweep"):
            pick = sweep[0] if method == "mobe" else min(sweep, key=lambda s: sum(e * e for e in s["rel_err"].values()))
            row = run_method(method, ctx, budget, support, pick["fits"], pick["seconds"])
            row["config"] = {**vars(pick["cfg"]), "m": pick["fits"]["gate"].info["m"]}
            if method == "mobe-sweep":
                row["method"] = "mobe-best"
                row["sweep_seconds"] = round(sum(s["seconds"] for s in sweep), 1)
        else:
            row = run_method(method, ctx, budget, support)
        out["rows"].append(row)
        out["ratios"] = ratios(out["rows"])
        if on_row is not None:
            on_row(out)
    out["seconds"] = round(out.get("seconds", 0.0) + time.perf_counter() - t0, 1)   # all its methods, fit + score
    return out


def ratios(rows: list[dict]) -> dict:
    """GloBE / MoBE (defaults and best of the sweep) ratios of KL and of each error, where both were run; and for
    every GloBE row, "GLOBE/best-peer": its KL over the lowest KL of any peer (not GloBE) row, which peer that is,
    and the peers whose top-1 agreement is not below GloBE's (the goal: KL <= 0.5x, top-1 above every peer)."""
    by = {r["method"]: r for r in rows}
    out = {}
    peers = [r for r in rows if not r["method"].startswith("globe")]
    for g in [r["method"] for r in rows if r["method"].startswith("globe")]:
        if peers:
            best = min(peers, key=lambda r: r["kl"])
            out[f"{g}/best-peer"] = {"best_peer": best["method"], "peer_kl": best["kl"],
                                     "kl": by[g]["kl"] / best["kl"] if best["kl"] else None,
                                     "top1": by[g]["top1"], "best_peer_top1": max(r["top1"] for r in peers),
                                     "top1_not_above": [r["method"] for r in peers if r["top1"] >= by[g]["top1"]]}
    named = ("globe", "globe-nonlinear", "globe-aware", *GLOBE_DEFAULTS)
    for g in named + tuple(m for m in by if m.startswith("globe") and m not in named):   # + relabelled rows
        for m in ("mobe", "mobe-best"):
            if g in by and m in by:
                a, b = by[g], by[m]
                out[f"{g}/{m}"] = {"kl": a["kl"] / b["kl"] if b["kl"] else None,
                                   **{f: a["rel_err"][f] / b["rel_err"][f] for f in FAMILIES},
                                   "output": a["output_rel_err"]["rel_err"] / b["output_rel_err"]["rel_err"],
                                   "delta_ppl": a["delta_ppl"] / b["delta_ppl"] if b["delta_ppl"] else None}
    return out


def cut_job(model_dir: str, cut: float, argv: list[str] | None) -> dict:
    """One (model, cut) in a worker process (one torch thread): its own context, its cut's rows."""
    torch.set_num_threads(1)
    args = parse_args(argv)
    setup_logging()
    return run_cut(prepare(Path(model_dir), args), cut, args)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("globe.fit", "globe.io", "globe.calibration", "globe.export", "globe.runtime"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> dict:
    """Run every model and cut (cuts in --jobs worker processes); write one JSON; return the report."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing
    from globe.core.files import atomic_write_text
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    passes = [args.methods] if not args.passes else [p.split(",") for p in args.passes]
    unknown = sorted({m for p in passes for m in p} - set(METHODS))
    if unknown or (args.passes and args.jobs > 1):
        raise SystemExit(f"peers.py: error: --passes: unknown methods {unknown} (choose from {', '.join(METHODS)})"
                         if unknown else "peers.py: error: --passes needs --jobs 1")
    args.methods = list(dict.fromkeys(m for p in passes for m in p))      # prepare() sees every method
    setup_logging()
    t_start = time.perf_counter()
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()}, "models": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(out, json.dumps(report, indent=1, default=float))      # partial results survive

    if args.jobs <= 1:                       # every model first, then pass by pass, cut by cut over every model
        contexts = [prepare(Path(model_dir), args) for model_dir in args.models]
        report["models"] = [{"model": ctx["info"], "cuts": []} for ctx in contexts]
        for methods in passes:
            for cut in args.cuts:
                for ctx, entry in zip(contexts, report["models"]):
                    def on_row(done: dict, cuts: list = entry["cuts"]) -> None:      # saved after every row
                        if not any(c is done for c in cuts):
                            cuts.append(done)
                        save()
                    earlier = next((c for c in entry["cuts"] if c["cut"] == cut), None)
                    on_row(run_cut(ctx, cut, args, on_row, methods, earlier))       # with its time
                    entry["cuts"].sort(key=lambda c: c["cut"])
                    save()
    for model_dir in args.models if args.jobs > 1 else ():
        ctx = prepare(Path(model_dir), args)                  # writes the statistics file the workers reuse
        entry = {"model": ctx["info"], "cuts": []}
        report["models"].append(entry)
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = [pool.submit(cut_job, model_dir, cut, argv) for cut in args.cuts]
            for future in as_completed(futures):                # each cut saved as soon as it is done
                entry["cuts"].append(future.result())
                entry["cuts"].sort(key=lambda c: c["cut"])
                save()
    save()
    log.info("wrote %s in %.0f s", out, report["seconds"])
    print_table(report)
    return report


def print_table(report: dict) -> None:
    for entry in report["models"]:
        print(f"{entry['model']['dir']}: original perplexity {entry['model']['original_perplexity']:.3f}")
        for cut in entry["cuts"]:
            print(f"  -{100 * cut['cut']:.0f}% total (budget {cut['budget_per_family']:.3f} per family)")
            for r in cut["rows"]:
                print(f"    {r['method']:13} KL {r['kl']:.5f} top-1 {r['top1']:.4f} "
                      f"gate {r['rel_err']['gate']:.4f} up {r['rel_err']['up']:.4f} "
                      f"out {r['output_rel_err']['rel_err']:.4f} ppl {r['perplexity']:8.3f} "
                      f"params {r['params_ratio']['gate']:.3f} total {r['total_params']:,} "
                      f"gate+up {sum(r['bytes'].values()):,} B "
                      f"fit {r['fit_seconds']:6.1f} s")


if __name__ == "__main__":
    main()
