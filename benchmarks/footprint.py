"""Memory and speed benchmark of the compressed export: bytes on disk, bytes held at runtime, peak memory, decode.

For each total cut (default the README's -25 % and -40 %, gate and up compressed) it fits the embedded model
(short fits: the bytes do not depend on the quality), writes the artifact (checkpoint dtype) and the compressed
export, then starts one worker process per variant (the original, and the export loaded with stock
`AutoModelForCausalLM.from_pretrained` in the default `cached` mode, `factored` and `dense`). Each worker loads its
model once and reports the bytes it holds (parameters + buffers + cache), its RSS before and after loading and after
decoding (the lifetime peak RSS of a CPU process is set by importing torch, so it is kept in the JSON only) and
the CUDA peak; the parent then
asks the workers in turn for a decode timing (interleaved rounds), so the speed ratios compare runs made side by
side. Goals (issue 15), checked and written to the JSON:
    disk:    on-disk size of the export / the original's  <=  1.02 x  its parameter ratio
    runtime: bytes the default mode holds / the original's  <=  stored ratio + 0.05
    decode:  decode tokens/s of the default mode / the original's (median of per-round ratios)  >=  0.95

    python benchmarks/footprint.py                       # -> benchmarks/results/footprint.json
    python benchmarks/footprint.py --cuts 0.25 --rounds 3 --device cuda
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("benchmarks.footprint")
MODES = ("cached", "factored", "dense")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from globe.assets import DEFAULT_MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the embedded model)")
    a("--text", default=str(DEFAULT_MODEL_DIR / "heldout.txt"), help="text the decode prompt is taken from")
    a("--cuts", type=float, nargs="+", default=[0.25, 0.40], help="total-parameter cuts to fit (default 0.25 0.40)")
    a("--am-iters", type=int, default=4, help="AM iterations of each (short) fit (default 4)")
    a("--varpro-steps", type=int, default=5, help="variable-projection evaluations of each fit (default 5)")
    a("--decode-tokens", type=int, default=32, help="greedy new tokens per decode timing (default 32)")
    a("--repeats", type=int, default=2, help="timings per worker and round; the median is kept (default 2)")
    a("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    a("--device", default="cpu", help="device of the workers (default cpu)")
    a("--dtype", default="auto", help="dtype the workers load in (default: the checkpoint's)")
    a("--work", help="directory for artifacts and exports (default: a temporary one)")
    a("--out", default=str(REPO / "benchmarks" / "results" / "footprint.json"), help="JSON output path")
    a("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- worker process: load one variant, answer timing requests on stdin ----
def worker(spec: dict) -> None:
    import torch
    import transformers
    import globe  # noqa: F401  (registers the quantizer)
    from globe.eval import decode_speed, encode_text, routed_footprint
    from globe.eval.speed import peak_rss_mb, rss_mb
    from globe.runtime import set_mode
    torch.set_num_threads(1)
    device = torch.device(spec["device"])
    rss_before = rss_mb()
    dtype = spec["dtype"] if spec["dtype"] == "auto" else getattr(torch, spec["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype, device_map=str(device))
    if spec.get("mode"):
        set_mode(model, spec["mode"])
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["path"])
    prompt = encode_text(tokenizer, Path(spec["text"]).read_text(encoding="utf-8")[:2000])[:16]
    fp = routed_footprint(model)
    _reply({"footprint": fp, "rss_before_load_mb": rss_before, "rss_after_load_mb": rss_mb()})
    for line in sys.stdin:
        if line.strip() == "decode":
            _reply(decode_speed(model, prompt, spec["decode_tokens"], spec["repeats"]))
        else:
            cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            _reply({"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb(), "cuda_peak_mb": cuda})
            return


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=float) + "\n")
    sys.stdout.flush()


class Worker:
    """A worker process for one variant (see `worker`)."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.loaded = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.proc.wait(timeout=60)
        return out


# ---- parent ----
def export_for(cut: float, args, work: Path) -> tuple[Path, dict]:
    """Fit at a total cut, save the artifact (checkpoint dtype) and the compressed export; (export dir, info)."""
    from globe.artifact import save
    from globe.export import save_compressed
    from globe.fit.solvers.budget import total_cut_budget
    from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
    from globe.fit.engine import fit_model
    from globe.io import open_checkpoint
    with open_checkpoint(args.model) as reader:
        inv = reader.inventory()
    budget, support = total_cut_budget(cut, inv, ("gate", "up"), 8)
    cfg = FitConfig(bank=BankConfig(budget=budget), sparsity=SparsityConfig(target_support=support),
                    train=TrainConfig(am_iters=args.am_iters, varpro_steps=args.varpro_steps))
    result = fit_model(args.model, cfg)
    artifact = save(result, work / f"art-{cut:.2f}")
    out = save_compressed(args.model, artifact, work / f"compressed-{cut:.2f}")
    saved = sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families)
    return out, {"cut": cut, "budget_per_family": budget, "total_params_before": inv.total_params,
                 "total_params_after": inv.total_params - saved,
                 "param_ratio": (inv.total_params - saved) / inv.total_params,
                 "families": {f: fam.shape for f, fam in result.families.items()},
                 "artifact_bytes": _disk(artifact), "export_bytes": _disk(out)}


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def timed(workers: dict[str, Worker], rounds: int) -> dict[str, dict]:
    """Decode tokens/s of every worker over interleaved rounds, and each variant's per-round ratio to `original`."""
    samples: dict[str, list[float]] = {name: [] for name in workers}
    for round_ in range(rounds):
        for name, w in workers.items():
            samples[name].append(w.ask("decode")["decode_tok_s"])
        log.info("round %d/%d: %s", round_ + 1, rounds, {k: round(v[-1], 1) for k, v in samples.items()})
    base = samples["original"]
    return {name: {"decode_tok_s": statistics.median(s), "decode_tok_s_best": max(s), "samples": s,
                   "ratio_to_original": statistics.median(a / b for a, b in zip(s, base))}
            for name, s in samples.items()}


def goals(row: dict, original_disk: int) -> dict:
    cached = row["variants"]["cached"]
    disk_ratio = row["export_bytes"] / original_disk
    runtime_ratio = cached["footprint"]["runtime_ratio"]
    stored = cached["footprint"]["stored_bytes_ratio"]
    decode = row["speed"]["cached"]["ratio_to_original"]
    return {"disk_ratio": disk_ratio, "disk_over_param_ratio": disk_ratio / row["param_ratio"],
            "disk_ok": disk_ratio <= 1.02 * row["param_ratio"], "runtime_ratio": runtime_ratio,
            "stored_ratio": stored, "runtime_ok": runtime_ratio <= stored + 0.05,
            "decode_ratio": decode, "decode_ok": decode >= 0.95}


def bench_cut(cut: float, args, work: Path, original_disk: int) -> dict:
    path, row = export_for(cut, args, work)
    spec = {"text": args.text, "device": args.device, "dtype": args.dtype, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats}
    workers = {"original": Worker({**spec, "path": args.model})}
    workers.update({mode: Worker({**spec, "path": str(path), "mode": mode}) for mode in MODES})
    try:
        row["speed"] = timed(workers, args.rounds)
    finally:
        closing = {name: w.close() for name, w in workers.items()}
    row["variants"] = {name: {**w.loaded, **closing[name]} for name, w in workers.items()}
    row["goals"] = goals(row, original_disk)
    log.info("-%.0f%%: %s", 100 * cut, row["goals"])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| cut | variant | bytes held | / original | stored ratio | RSS after load, after decode (MiB above "
             "the process before loading) | decode tok/s | / original |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, v in row["variants"].items():
            fp, s = v["footprint"], row["speed"][name]
            rss = f"+{v['rss_after_load_mb'] - v['rss_before_load_mb']:.0f}, +{v['rss_mb'] - v['rss_before_load_mb']:.0f}"
            cuda = f" (CUDA peak {v['cuda_peak_mb']:.0f})" if v.get("cuda_peak_mb") is not None else ""
            lines.append(f"| -{100 * row['cut']:.0f} % | {name} | {fp['model_bytes']:,} | {fp['runtime_ratio']:.3f} | "
                         f"{fp['stored_bytes_ratio']:.3f} | {rss}{cuda} | {s['decode_tok_s']:.1f} | "
                         f"{s['ratio_to_original']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch
    from globe.core.files import atomic_write_text
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        original_disk = _disk(Path(args.model))
        rows = [bench_cut(cut, args, work, original_disk) for cut in args.cuts]
    report = {"model": args.model, "original_disk_bytes": original_disk, "rows": rows,
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
              "machine": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                          "device": args.device},
              "all_goals_met": all(v for r in rows for k, v in r["goals"].items() if k.endswith("_ok")),
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(Path(args.out), json.dumps(report, indent=1, default=float))
    print(table(rows))
    for row in rows:
        print(f"-{100 * row['cut']:.0f} %: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in row["goals"].items()))
    log.info("wrote %s in %.0f s", args.out, report["seconds"])


if __name__ == "__main__":
    main()
