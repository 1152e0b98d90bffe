"""Issue 26 on a GPU: a LOADABLE Qwen1.5-MoE-A2.7B-shaped model of L layers compressed by `globe compress` with its
defaults at --total-cut 0.25 of the FULL model (wall time and peak GPU memory per phase, extrapolated to 24 layers
beside the dry run's prediction), MoBE's recipe on one layer of the same shape at GloBE's parameters, and decode
tokens/s and peak memory of the original and the compressed model at batch 1 and 16. scripts/device_issue26.sh
runs each step in its own process with its own time limit; every step adds its section to one JSON file (saved
after each phase and AM iteration, and on SIGTERM: a step stopped by its limit leaves what it measured).

    python benchmarks/gpu_real_shape.py build --work /tmp/i26 --json $OUT/gpu_real_shape.json --device cuda
    python benchmarks/gpu_real_shape.py short | decode | mobe | dryrun | compress | report   (the same options)
    python benchmarks/gpu_real_shape.py all --layers 2 --hidden 64 --experts 8 --intermediate 256 --shared 256 \
        --heads 4 --vocab 4096 --device cpu --work /tmp/tiny --json /tmp/tiny.json     # the CPU test's shape

The cut: `--total-cut 0.25` of the 24-layer model is the per-family budget B (globe.fit.solvers.budget.
total_cut_budget on a sparse 24-layer checkpoint of the shape, below), given to the L-layer runs as `--budget B`
(the same fit config: 8-bit factors, the same support); `--total-cut 0.25` of the L-layer model itself would ask
for far less (one layer: impossible), its embedding and lm head weighing as much as 24 layers'.

Steps and sections of the JSON:
  build     the model: transformers Qwen2-MoE (model_type qwen2_moe) of the given shape, random init (seeded)
            except the routed experts and routers, which are generated like benchmarks/make_upcycled.py (its
            functions, its seed); saved with save_pretrained in bf16; the embedded model's tokenizer copied in
            (its vocabulary, 4096 ids, fits any --vocab >= 4096: the embedding rows above it are never produced by
            the tokenizer but the model can sample them). Seconds of each part, bytes written.
  short     `globe compress MODEL -o OUT --budget B --device D` + SHORT_FLAGS (2 AM iterations, 2 VarPro and 2
            activation steps, 10 expert and 10 quantized-expert steps), parsed by the command's own parser and run
            as the command runs it (globe.cli.compress.compress_run + globe.run.compress.run_compress): wall time,
            per phase (the fit's phases per family, globe.fit.engine.phases, plus the run's calibrate and export)
            seconds and peak memory (CUDA: max allocated, reset at each phase start; CPU: peak RSS so far), the
            seconds of every AM iteration, the iterations each iterative phase made, the fit's summary (m, r,
            params ratio, rel_err per family); "extrapolated": each iterative phase x (default iterations / its
            iterations here), then the 24-layer model (x 24 / L).
  decode    globe.eval.decode_speed (greedy, KV cache) of the original (bf16) and the compressed model (its
            default runtime mode, bf16; the default run's checkpoint when it finished, else the short run's: the
            same shape, bits and support) at each --batches (random prompts, one per row, real routing):
            tokens/s (all rows), CUDA peak during decode and memory held by the loaded model; the compressed
            model's generated tokens' shape.
  mobe      benchmarks/baselines/mobe.py on layer 0's gate and up (fp32 on the device) at GloBE's stored/dense
            params of that family (its rank solved from that budget): seconds of the SVD-group init, seconds per
            Adam epoch (two runs of --mobe-epochs-short and --mobe-epochs from the same init after a warm-up, the
            difference), and the seconds per layer at the authors' epochs (train.py's default 30000; 10000 /
            15000 of the repository README's commands also given).
  dryrun    globe.fit.planning.plan_fit of the default config (what `globe compress --dry-run` prints) on the
            L-layer model at the short run's (m, r), and on a 24-layer checkpoint of the full shape whose files
            are sparse (headers real, data zeros: nothing written) at the same (m, r) (given shapes: the plan reads
            no weights).
  compress  the default run: as short without SHORT_FLAGS; stopped by its limit, its section keeps the phases
            done, the one running and the AM iterations' seconds; finished, its own extrapolation (x 24 / L).
  report    the issue's numbers beside its goals: whole model (minutes, peak GiB; the dry run's full-shape
            prediction beside), GloBE's fit vs MoBE per layer, decode speed-ups and bytes held.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                     # run as a script: benchmarks.* importable
    sys.path.insert(0, str(REPO))

from benchmarks import make_upcycled  # noqa: E402
from globe.core.files import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmarks.gpu_real_shape")
STEPS = ("build", "short", "decode", "mobe", "dryrun", "compress", "report")
FULL_LAYERS = 24                                  # Qwen1.5-MoE-A2.7B
AUTHORS_EPOCHS = {"train.py default": 30000, "README DeepSeek-V3": 10000, "README Kimi-K2": 15000}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("step", choices=(*STEPS, "all"), help="what to run (all: every step in this process)")
    a("--work", required=True, help="working directory: model/, compressed/, full_sparse/")
    a("--json", required=True, help="JSON results file (sections added by each step)")
    a("--layers", type=int, default=1,
      help="MoE layers L of the built model (default 1: what fits the device run's ~9 minutes, README)")
    a("--hidden", type=int, default=2048, help="hidden size d (2048)")
    a("--experts", type=int, default=60, help="routed experts per layer (60)")
    a("--intermediate", type=int, default=1408, help="routed expert rows p (1408)")
    a("--top-k", type=int, default=4, help="experts per token (4)")
    a("--shared", type=int, default=5632, help="shared expert intermediate size (5632)")
    a("--heads", type=int, default=16, help="attention heads (16; key/value heads the same)")
    a("--vocab", type=int, default=151936, help="vocabulary size of the embedding / lm head (151936)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda", help="device of every step (cuda; cpu for the test)")
    a("--total-cut", type=float, default=0.25, help="globe compress --total-cut (0.25)")
    a("--full-layers", type=int, default=FULL_LAYERS, help="layers of the full model extrapolated to (24)")
    a("--mobe-epochs-short", type=int, default=10, help="epochs of MoBE's first timed run (10)")
    a("--mobe-epochs", type=int, default=210, help="epochs of MoBE's second timed run (210)")
    a("--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes (1 16)")
    a("--prompt-tokens", type=int, default=32, help="prompt tokens per row (32)")
    a("--decode-tokens", type=int, default=64, help="greedy new tokens per timing (64)")
    a("--repeats", type=int, default=3, help="timed repeats of each decode (median; 3)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- results
def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_section(path: Path, name: str, section) -> None:
    """Read-modify-write of one section (the steps run one after the other, never together)."""
    results = load_results(path)
    results[name] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1, default=float))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """CUDA max allocated since the last reset, else this process's peak RSS so far (GiB)."""
    from globe.device import peak_memory_mb
    return round(peak_memory_mb(device) / 2**10, 3)


def machine(device: torch.device) -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- build
def model_config(args: argparse.Namespace, layers: int):
    """transformers Qwen2MoeConfig of the requested shape (other fields as Qwen1.5-MoE-A2.7B); the embedded
    tokenizer's special ids."""
    import transformers
    from globe.assets import DEFAULT_MODEL_DIR
    ref = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    return transformers.Qwen2MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.intermediate, intermediate_size=args.shared,
        shared_expert_intermediate_size=args.shared, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        vocab_size=args.vocab, max_position_embeddings=8192, rms_norm_eps=1e-6, norm_topk_prob=False,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
        bos_token_id=ref.get("bos_token_id"), eos_token_id=ref.get("eos_token_id"),
        pad_token_id=ref.get("pad_token_id"))


def upcycled_args(args: argparse.Namespace) -> argparse.Namespace:
    """make_upcycled's options for these expert dims (its defaults for the rest: 4 parents, row space q = 256)."""
    return make_upcycled.parse_args(["--out", "-", "--layers", str(args.layers), "--experts", str(args.experts),
                                     "--top-k", str(args.top_k), "--hidden", str(args.hidden), "--intermediate",
                                     str(args.intermediate), "--seed", str(args.seed)])


@torch.no_grad()
def set_upcycled_experts(model, args: argparse.Namespace) -> None:
    """Routed experts and routers of every layer from make_upcycled.layer_tensors (hub per-expert tensors) into
    the fused transformers layout: gate_up_proj [E, 2p, d] (gate rows first), down_proj [E, d, p]."""
    up = upcycled_args(args)
    gen = torch.Generator().manual_seed(up.seed)
    space = make_upcycled.shared_row_space(up, gen)
    for layer, block in enumerate(model.model.layers):
        tensors = make_upcycled.layer_tensors(layer, space, up, gen)
        mlp, p = block.mlp, args.intermediate
        mlp.gate.weight.copy_(tensors.pop(make_upcycled.ROUTER.format(layer=layer)))
        for e in range(args.experts):
            key = lambda proj: make_upcycled.KEY.format(layer=layer, expert=e, proj=proj)   # noqa: E731
            mlp.experts.gate_up_proj[e, :p].copy_(tensors[key("gate_proj")])
            mlp.experts.gate_up_proj[e, p:].copy_(tensors[key("up_proj")])
            mlp.experts.down_proj[e].copy_(tensors[key("down_proj")])
        del tensors


def step_build(args: argparse.Namespace, device: torch.device) -> dict:
    import transformers
    from globe.assets import DEFAULT_MODEL_DIR
    out = Path(args.work) / "model"
    shutil.rmtree(out, ignore_errors=True)
    row: dict = {"layers": args.layers, "dir": str(out)}
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(device):                           # random init where it is fast (the GPU on the device)
        model = transformers.AutoModelForCausalLM.from_config(model_config(args, args.layers), dtype=torch.bfloat16)
    sync(device)
    row["init_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    set_upcycled_experts(model, args)
    sync(device)
    row["upcycled_experts_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEFAULT_MODEL_DIR / name, out / name)
    row["save_seconds"] = round(time.perf_counter() - t, 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    row["tokenizer"] = {"source": f"copied from {DEFAULT_MODEL_DIR.name}", "vocab": len(tokenizer),
                        "model_vocab": args.vocab}
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is below the embedded tokenizer's {len(tokenizer)} ids")
    row["params"] = sum(p.numel() for p in model.parameters())
    row["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row["seconds"] = round(row["init_seconds"] + row["upcycled_experts_seconds"] + row["save_seconds"], 2)
    log.info("built %s: %d layers, %.2f GB in %.0f s", out, args.layers, row["bytes"] / 1e9, row["seconds"])
    return row


# ---------------------------------------------------------------------------------------------------- compress
# the short run: every phase of the default run, few iterations of the iterative ones (their cost per iteration);
# its checkpoint has the default run's shape, bits and support, so it also serves the decode timing
SHORT_FLAGS = ("--am-iters", "2", "--varpro-steps", "2", "--activation-steps", "2", "--expert-steps", "10",
               "--quant-steps", "10")
OUT_DIRS = {"short": "compressed_short", "compress": "compressed"}
ITERATIVE = ("am", "varpro", "activation", "expert", "quant_expert")      # phases timed per iteration / step


def default_config(args: argparse.Namespace):
    """`globe compress MODEL -o X --total-cut C` parsed and configured by the command's own code: (parsed, cfg)."""
    from globe.cli import compress as cli
    from globe.cli.main import build_parser
    parsed = build_parser().parse_args(["compress", str(Path(args.work) / "model"), "-o", "unused",
                                        "--total-cut", str(args.total_cut)])
    return parsed, cli._config_plans(parsed)[0]


def full_cut(args: argparse.Namespace) -> dict:
    """The per-family budget (and target support) that --total-cut C gives on the FULL model (24 layers): on the
    L-layer model the embedding and lm head weigh more, so the same cut would ask for a much smaller budget; the
    runs give it as --budget (the same fit config as --total-cut C on the full model: 8-bit factors either way)."""
    from globe.fit.solvers.budget import total_cut_budget
    from globe.io import open_checkpoint
    _, cfg = default_config(args)
    sparse = Path(args.work) / "full_sparse"
    if not (sparse / "config.json").is_file():
        write_sparse_checkpoint(args, sparse, args.full_layers)
    with open_checkpoint(sparse) as reader:
        inv = reader.inventory()
    budget, support = total_cut_budget(args.total_cut, inv, tuple(cfg.bank.families), cfg.sparsity.target_support)
    return {"budget": round(budget, 6), "target_support": support, "default_support": cfg.sparsity.target_support,
            "total_params_full": inv.total_params, "families": list(cfg.bank.families)}


def compress_argv(args: argparse.Namespace, out: str, cut: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """`globe compress MODEL -o OUT --budget B --device D` (B: --total-cut C on the full model), the rest default."""
    work = Path(args.work)
    argv = ["compress", str(work / "model"), "-o", str(work / out), "--budget", str(cut["budget"]),
            "--device", args.device, "--overwrite"]
    if cut["target_support"] != cut["default_support"]:
        argv += ["--target-support", str(cut["target_support"])]
    return argv + list(extra)


def phase_recorder(device: torch.device, row: dict, on_end):
    """Listener of globe.fit.engine.phases: seconds and peak GiB of each occurrence in row["phases"], keyed
    family/phase (the run's calibrate and export have no family); CUDA peaks reset at every phase start; the
    phase running now in row["in_flight"]."""
    started: dict[str, float] = {}

    def on_phase(event: str, family: str, name: str, record: dict | None) -> None:
        key = f"{family}/{name}" if family else name
        if event == "start":
            reset_peak(device)
            started[key] = time.perf_counter()
            row["in_flight"] = {"phase": key, "since": time.time()}
            return
        sync(device)
        phase = row["phases"].setdefault(key, {"seconds": 0.0, "peak_gib": 0.0, "calls": 0})
        phase["seconds"] = round(phase["seconds"] + time.perf_counter() - started.pop(key), 3)
        phase["peak_gib"] = max(phase["peak_gib"], peak_gib(device))
        phase["calls"] += 1
        row["in_flight"] = None
        on_end()
    return on_phase


class AMListener:
    """tracking sink: the seconds of every AM iteration per family (row["am_iter_seconds"]), saved as they come."""

    def __init__(self, row: dict, save) -> None:
        self.row, self.save = row, save

    def write(self, record: dict) -> None:
        if record.get("event") == "am_iter":
            self.row["am_iter_seconds"].setdefault(record.get("family", ""), []).append(
                round(float(record.get("seconds", 0.0)), 3))
            self.save()

    def close(self) -> None:
        pass


def phase_counts(result) -> dict[str, int]:
    """Iterations / evaluations / steps the run made in each iterative phase, keyed like the phases."""
    counts = {}
    for family, fam in result.families.items():
        for name in ("am", "varpro", "activation"):
            if fam.history.get(name):
                counts[f"{family}/{name}"] = len(fam.history[name])
        for name in ("expert", "quant_expert"):
            steps = (fam.metrics.get(name) or {}).get("steps")
            if steps:
                counts[f"gate+up/{name}"] = int(steps)
    return counts


def default_counts(cfg) -> dict[str, int]:
    """The default run's iteration budgets per iterative phase (maxima: tolerances may stop a phase earlier)."""
    return {"am": cfg.train.am_iters, "varpro": cfg.train.varpro_steps, "activation": cfg.activation.steps,
            "expert": cfg.expert.steps, "quant_expert": cfg.expert.quant_steps}


def measured_compress(args: argparse.Namespace, device: torch.device, section: str, out: str,
                      extra: tuple[str, ...] = ()) -> dict:
    """Run globe compress as the command does (its parser, its config, globe.run.compress) with the phase
    recorder and the AM listener; the section is saved after every phase and AM iteration, and on SIGTERM (the
    step's timeout) with the phase that was running."""
    import signal
    from globe import tracking
    from globe.cli import compress as cli
    from globe.cli.main import build_parser
    from globe.fit.engine.phases import listen
    from globe.run.compress import run_compress
    from globe.run.fit import fit_summary, total_cut_of
    cut = full_cut(args)
    argv = compress_argv(args, out, cut, extra)
    parsed = build_parser().parse_args(argv)
    cfg, plans = cli._config_plans(parsed)
    row: dict = {"command": "globe " + " ".join(argv), "layers": args.layers, "cut": cut, "finished": False,
                 "phases": {}, "am_iter_seconds": {}, "in_flight": None}
    save = lambda: save_section(Path(args.json), section, row)                    # noqa: E731
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))                        # timeout: SystemExit here
    t = time.perf_counter()
    try:
        with listen(phase_recorder(device, row, save)), tracking.attached(AMListener(row, save)):
            done = run_compress(cli.compress_run(parsed, cfg, plans, row["command"]))
    except SystemExit:
        row["seconds_until_stopped"] = round(time.perf_counter() - t, 2)
        if row["in_flight"]:
            row["in_flight"]["seconds"] = round(time.time() - row["in_flight"].pop("since"), 2)
        save()
        raise
    sync(device)
    result = done["result"]
    row.update(finished=True, seconds=round(time.perf_counter() - t, 2), summary=fit_summary(result),
               counts=phase_counts(result), bytes=cli.bytes_line(result), total_cut_of_this_model=total_cut_of(result),
               calibration=result.source.get("calibration"))
    row["fit_seconds_per_family"] = {f: round(sum(v["seconds"] for k, v in row["phases"].items()
                                                  if k.startswith(f"{f}/")), 2)
                                     for f in dict.fromkeys(k.split("/")[0] for k in row["phases"] if "/" in k)}
    row["other_seconds"] = round(row["seconds"] - sum(v["seconds"] for v in row["phases"].values()), 2)
    row["peak_gib"] = max((v["peak_gib"] for v in row["phases"].values()), default=0.0)
    log.info("%s: %.0f s, peak %.2f GiB; %s", section, row["seconds"], row["peak_gib"], row["bytes"])
    return row


def step_short(args: argparse.Namespace, device: torch.device) -> dict:
    """The short run; its extrapolation: each iterative phase x (default budget / its count here), then x 24 / L."""
    row = measured_compress(args, device, "short", OUT_DIRS["short"], SHORT_FLAGS)
    _, cfg = default_config(args)
    row["default_counts"] = default_counts(cfg)
    row["extrapolated"] = extrapolate(row, args.layers, args.full_layers, device.type == "cuda",
                                      row["default_counts"])
    return row


def step_compress(args: argparse.Namespace, device: torch.device) -> dict:
    """The default run (every default, --budget of --total-cut C on the full model); extrapolated x 24 / L."""
    row = measured_compress(args, device, "compress", OUT_DIRS["compress"])
    row["extrapolated"] = extrapolate(row, args.layers, args.full_layers, device.type == "cuda")
    return row


def extrapolate(row: dict, layers: int, full: int, scale_peaks: bool = True,
                counts_to: dict[str, int] | None = None) -> dict:
    """The full model from an L-layer run: with counts_to (the short run), each iterative phase's seconds first x
    (default budget / iterations it made); then every phase's seconds (and the rest of the wall time) x full / L:
    the fit's work is linear in the experts N = L x E, calibration and export in the layers; the parts that do
    not grow with the layers (embedding, lm head, the bank's own terms) are scaled too, so this is an upper bound
    on them, as the default budgets are on iterations that a tolerance may stop earlier. Peaks x full / L on CUDA
    (targets, codes and calibration per expert; the model on the GPU at calibration), None on the CPU (peak RSS
    holds the process's own baseline). fit_seconds_per_layer: each family's phases (gate+up: the joint ones) / L."""
    scale = full / layers
    peak = (lambda v: round(v * scale, 2)) if scale_peaks else (lambda v: None)       # noqa: E731
    counts = row.get("counts", {})
    phases = {}
    for key, v in row["phases"].items():
        name = key.split("/")[-1]
        factor = counts_to[name] / counts[key] if counts_to and name in ITERATIVE and counts.get(key) else 1.0
        phases[key] = {"seconds_at_l_layers": round(v["seconds"] * factor, 2),
                       "seconds": round(v["seconds"] * factor * scale, 1), "peak_gib": peak(v["peak_gib"])}
    seconds = (sum(v["seconds_at_l_layers"] for v in phases.values()) + row["other_seconds"]) * scale
    families: dict[str, float] = {}
    for key, v in phases.items():
        if "/" in key:
            families[key.split("/")[0]] = families.get(key.split("/")[0], 0.0) + v["seconds_at_l_layers"] / layers
    return {"how": (f"iterative phases x (default iterations / iterations of this run), then " if counts_to else "")
            + f"per-layer costs x {full}: every phase (and the rest of the wall time) x {full}/{layers}",
            "layers": full, "seconds": round(seconds, 1), "minutes": round(seconds / 60, 1),
            "peak_gib": peak(row["peak_gib"]), "phases": phases,
            "fit_seconds_per_layer": {f: round(s, 2) for f, s in families.items()}}


# ---------------------------------------------------------------------------------------------------- dry run
def write_sparse_checkpoint(args: argparse.Namespace, out: Path, layers: int) -> Path:
    """config.json, the embedded tokenizer and one safetensors file per layer (plus one for the rest) holding every
    tensor of an L-layer model of this shape in the hub layout that save_pretrained writes, data all zeros in
    sparse files (truncate: no bytes written): globe.io reads the inventory from the headers, and a plan at a given
    (m, r) reads no weights."""
    import transformers
    from globe.assets import DEFAULT_MODEL_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = model_config(args, layers)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes: dict[str, list[int]] = {}
    for name, t in meta.state_dict().items():
        if name.endswith("experts.gate_up_proj"):            # hub layout: one tensor per expert and projection
            e, rows, d = t.shape
            for i in range(e):
                shapes[name.replace("gate_up_proj", f"{i}.gate_proj.weight")] = [rows // 2, d]
                shapes[name.replace("gate_up_proj", f"{i}.up_proj.weight")] = [rows // 2, d]
        elif name.endswith("experts.down_proj"):
            for i in range(t.shape[0]):
                shapes[name.replace("down_proj", f"{i}.down_proj.weight")] = list(t.shape[1:])
        else:
            shapes[name] = list(t.shape)
    shards: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        shard = f"layer-{int(parts[2]):05d}.safetensors" if parts[:2] == ["model", "layers"] else "rest.safetensors"
        shards.setdefault(shard, {})[name] = shape
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        total += sparse_safetensors(out / shard, tensors)
        weight_map.update({name: shard for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": dict(sorted(weight_map.items()))}))
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEFAULT_MODEL_DIR / name, out / name)
    return out


def sparse_safetensors(path: Path, tensors: dict[str, list[int]]) -> int:
    """A bf16 safetensors file of these shapes, all zeros, as a sparse file; returns its data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(tensors.items()):
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                          # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return offset


def plan_summary(plan: dict) -> dict:
    """Seconds and peak GiB of a plan (globe.fit.planning.plan.Plan.to_dict()), total and per family."""
    return {"seconds": plan["seconds"], "peak_gib": round(plan["peak_bytes"] / 2**30, 2),
            "families": {f["family"]: {"m": f["m"], "r": f["r"], "seconds": f["seconds"],
                                       "peak_gib": round(f["memory"]["peak"] / 2**30, 2)} for f in plan["families"]}}


def step_dryrun(args: argparse.Namespace, device: torch.device) -> dict:
    """The default run's config planned on the L-layer model (what `globe compress --dry-run` plans: its budget
    solver reads the experts), then at the chosen (m, r) of each family on the sparse full shape (no data read)."""
    import copy
    from globe.cli import compress as cli
    from globe.cli.main import build_parser
    from globe.fit.planning.plan import plan_fit
    from globe.fit.planning.timing import KernelRates
    work = Path(args.work)
    cut = full_cut(args)
    cfg, _ = cli._config_plans(build_parser().parse_args(compress_argv(args, "compressed", cut)))
    row: dict = {"note": "the dry run plans the fit's own phases; calibration, the activation stage, the expert "
                         "phases and the export are not planned"}
    t = time.perf_counter()
    chosen = (load_results(Path(args.json)).get("short") or {}).get("summary")
    if chosen:                       # the (m, r) the budget solver chose in the short run: no second solve
        plans = []
        for family in cfg.bank.families:
            given = copy.deepcopy(cfg)
            given.bank.m, given.bank.r = chosen[family]["m"], chosen[family]["r"]
            given.bank.families = (family,)
            plans.append(plan_fit(work / "model", given,
                                  rates=KernelRates.from_dict(plans[0]["rates"]) if plans else None).to_dict())
        measured = {"seconds": round(sum(p["seconds"] for p in plans), 1),
                    "peak_bytes": max(p["peak_bytes"] for p in plans), "rates": plans[0]["rates"],
                    "families": [f for plan in plans for f in plan["families"]]}
    else:                            # the budget solver on the experts, as `globe compress --dry-run` runs it
        measured = plan_fit(work / "model", copy.deepcopy(cfg)).to_dict()
    row["measured_shape"] = {"layers": args.layers, **plan_summary(measured),
                             "shape_from": "the short run's (m, r)" if chosen else "the budget solver",
                             "seconds_to_plan": round(time.perf_counter() - t, 1), "plan": measured}
    save_section(Path(args.json), "dryrun", row)
    t = time.perf_counter()
    rates = KernelRates.from_dict(measured["rates"]) if measured["rates"].get("benchmark_seconds") else None
    plans = []
    for fam in measured["families"]:                               # each family at its own (m, r): no data read
        full = copy.deepcopy(cfg)
        full.bank.m, full.bank.r, full.bank.families = fam["m"], fam["r"], (fam["family"],)
        plans.append(plan_fit(work / "full_sparse", full, rates=rates).to_dict())
    full_plan = {"seconds": round(sum(p["seconds"] for p in plans), 1),
                 "peak_bytes": max(p["peak_bytes"] for p in plans),
                 "families": [f for plan in plans for f in plan["families"]]}
    row["full_shape"] = {"layers": args.full_layers, "shape_from": "the L-layer plan's (m, r) of each family",
                         **plan_summary(full_plan), "seconds_to_plan": round(time.perf_counter() - t, 1)}
    return row


# ---------------------------------------------------------------------------------------------------- MoBE
def mobe_family(weights: torch.Tensor, budget: float, args: argparse.Namespace, device: torch.device) -> dict:
    """MoBE (benchmarks/baselines/mobe.py) of one layer's family [1, E, p, d] at `budget`: init and epoch costs."""
    from benchmarks.baselines import mobe
    cfg = mobe.MobeConfig()
    _, e, p, d = weights.shape
    m = cfg.m or max(1, e // 4)
    r = mobe.mobe_rank(e, p, d, m, budget)
    target = weights.to(device=device, dtype=torch.float16).float()
    std = target.flatten(1).std(dim=1).view(1, 1, 1, 1)
    reset_peak(device)
    t = time.perf_counter()
    init = mobe.svd_group_init(target, m, r)
    sync(device)
    init_seconds = time.perf_counter() - t
    mobe._train([torch.nn.Parameter(x.clone()) for x in init], target / std, std, mobe.MobeConfig(epochs=2))
    sync(device)                                         # warm-up (kernels, allocator): not timed
    runs = {}
    for epochs in (args.mobe_epochs_short, args.mobe_epochs):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        t = time.perf_counter()
        best = mobe._train(params, target / std, std, mobe.MobeConfig(epochs=epochs))
        sync(device)
        runs[epochs] = time.perf_counter() - t
    per_epoch = (runs[args.mobe_epochs] - runs[args.mobe_epochs_short]) / (args.mobe_epochs - args.mobe_epochs_short)
    with torch.no_grad():
        out = mobe.compose(*best, mobe.ACTS[cfg.act]) * std
        rel = float((out - target).square().sum().sqrt() / target.square().sum().sqrt())
    return {"m": m, "r": r, "budget": round(budget, 5), "params": mobe.mobe_params(1, e, p, d, m, r),
            "init_seconds": round(init_seconds, 3), "run_seconds": {str(k): round(v, 3) for k, v in runs.items()},
            "seconds_per_epoch": round(per_epoch, 5), "rel_err_after_epochs": {str(args.mobe_epochs): round(rel, 5)},
            "peak_gib": peak_gib(device),
            "seconds_at_authors_epochs": {name: round(init_seconds + n * per_epoch, 1)
                                          for name, n in AUTHORS_EPOCHS.items()}}


def step_mobe(args: argparse.Namespace, device: torch.device) -> dict:
    from globe.io import open_checkpoint
    results = load_results(Path(args.json))
    source = next((k for k in ("compress", "short") if (results.get(k) or {}).get("finished")), None)
    summary = results[source]["summary"] if source else {}
    cut = full_cut(args)
    with open_checkpoint(Path(args.work) / "model") as reader:
        inv = reader.inventory()
        row: dict = {"layer": 0, "families": {}, "budget_from": f"GloBE's stored/dense params of each family "
                     f"({source} run)" if source else "the budget of --total-cut on the full model"}
        for family in ("gate", "up"):
            budget = summary.get(family, {}).get("params_ratio", cut["budget"])
            stack = reader.read_family(family, [inv.moe_layers[0]])
            weights = stack.weights.reshape(1, *stack.weights.shape)              # [1, E, p, d]
            row["families"][family] = mobe_family(weights, budget, args, device)
            save_section(Path(args.json), "mobe", row)
    row["seconds_per_layer_gate_up"] = {
        name: round(sum(f["seconds_at_authors_epochs"][name] for f in row["families"].values()), 1)
        for name in AUTHORS_EPOCHS}
    return row


# ---------------------------------------------------------------------------------------------------- decode
def decode_one(model, prompts: dict[int, torch.Tensor], args: argparse.Namespace, device: torch.device) -> dict:
    from globe.eval import decode_speed
    sync(device)
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"model_gib": None if held is None else round(held, 3),
           "tensor_gib": round(sum(t.numel() * t.element_size()
                                   for t in [*model.parameters(), *model.buffers()]) / 2**30, 3),
           "batches": {}}
    for batch, ids in prompts.items():
        reset_peak(device)
        speed = decode_speed(model, ids, args.decode_tokens, args.repeats)
        out["batches"][str(batch)] = {**{k: v for k, v in speed.items()}, "peak_gib": peak_gib(device)}
        log.info("batch %d: %.1f tokens/s", batch, speed["decode_tok_s"])
    return out


def step_decode(args: argparse.Namespace, device: torch.device) -> dict:
    import gc
    import globe
    from globe.export import load_model
    from globe.runtime import globe_modules
    work = Path(args.work)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(work / "model"))
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_tokens), generator=gen) for b in args.batches}
    row: dict = {"dtype": "bfloat16", "prompt_tokens": args.prompt_tokens, "new_tokens": args.decode_tokens}
    model = load_model(work / "model", torch.bfloat16, device=str(device))
    row["original"] = decode_one(model, prompts, args, device)
    save_section(Path(args.json), "decode", row)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results = load_results(Path(args.json))
    source = next((k for k in ("compress", "short") if (results.get(k) or {}).get("finished")), None)
    if source is None:
        raise SystemExit("decode: no compressed checkpoint (neither the short nor the default compress finished)")
    model = globe.load_compressed(work / OUT_DIRS[source], device=device, dtype=torch.bfloat16)
    modes = sorted({str(getattr(m, "mode", "?")) for m in globe_modules(model).values()})
    row["compressed"] = {"from": f"the {source} run ({OUT_DIRS[source]}): the default run's shape, bits and "
                                 "support" + (", fewer iterations" if source == "short" else ""),
                         "runtime_mode": modes, **decode_one(model, prompts, args, device)}
    from globe.eval.speed import _generate
    with torch.no_grad():
        tokens = _generate(model, prompts[min(prompts)].to(device), args.decode_tokens)
    row["compressed"]["generated_shape"] = list(tokens.shape)
    row["compressed"]["generated_new_tokens"] = int(tokens.shape[1] - args.prompt_tokens)
    row["speedup"] = {b: round(row["compressed"]["batches"][b]["decode_tok_s"]
                               / row["original"]["batches"][b]["decode_tok_s"], 3) for b in row["original"]["batches"]}
    return row


# ---------------------------------------------------------------------------------------------------- report
def step_report(args: argparse.Namespace, device: torch.device) -> dict:
    """The issue's numbers side by side with its goals, from the sections present (nothing run)."""
    r = load_results(Path(args.json))
    default, short = r.get("compress") or {}, r.get("short") or {}
    basis = default if default.get("finished") else short
    row: dict = {"extrapolated_from": "the default run" if default.get("finished") else
                 "the short run (iterative phases at the default budgets)" if short.get("finished") else None}
    if basis.get("finished"):
        ext = basis["extrapolated"]
        planned, full_plan = set(), (r.get("dryrun") or {}).get("full_shape") or {}
        for fam in full_plan.get("families", {}).values():
            planned |= {k for k in fam["seconds"] if k != "total"}
        row["whole_model"] = {"minutes": ext["minutes"], "peak_gib": ext["peak_gib"],
                              "goal": "< 30 minutes, < 40 GiB on one H100 / H200",
                              "fit_phases_the_dry_run_plans_seconds": round(sum(
                                  v["seconds"] for k, v in ext["phases"].items() if k.split("/")[-1] in planned), 1)
                              if planned else None,
                              "dry_run_full_shape_seconds": full_plan.get("seconds"),
                              "dry_run_full_shape_peak_gib": full_plan.get("peak_gib")}
        layer = ext["fit_seconds_per_layer"]
        globe_fit = sum(layer.get(f, 0.0) for f in ("gate", "up"))
        mobe = (r.get("mobe") or {}).get("seconds_per_layer_gate_up")
        if mobe and globe_fit:
            row["per_layer"] = {"globe_fit_gate_up_seconds": round(globe_fit, 2),
                                "globe_fit_with_joint_phases_seconds": round(sum(layer.values()), 2),
                                "mobe_seconds": mobe, "mobe_over_globe_fit": {k: round(v / globe_fit, 2)
                                                                                for k, v in mobe.items()},
                                "goal": "MoBE >= 3 x GloBE's time per layer at equal parameters"}
    if default and not default.get("finished"):
        row["default_run_stopped"] = {"after_seconds": default.get("seconds_until_stopped"),
                                      "in_flight": default.get("in_flight"), "phases_done": list(default["phases"]),
                                      "am_iter_seconds": default.get("am_iter_seconds")}
    decode = r.get("decode") or {}
    if "speedup" in decode:
        row["decode"] = {"speedup": decode["speedup"], "goal": ">= 1.0 x the original's tokens/s at batch 1",
                         "gib_held": {k: decode[k]["model_gib"] if decode[k]["model_gib"] is not None
                                      else decode[k]["tensor_gib"] for k in ("original", "compressed")}}
    return row


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    from globe.device import resolve_device
    device = resolve_device(args.device)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    results = load_results(path)
    if "settings" not in results:
        save_section(path, "settings", {k: v for k, v in vars(args).items() if k not in ("step",)})
        save_section(path, "machine", machine(device))
    steps = STEPS if args.step == "all" else (args.step,)
    for step in steps:
        t = time.perf_counter()
        row = globals()[f"step_{step}"](args, device)
        row["step_seconds"] = round(time.perf_counter() - t, 2)
        save_section(path, step, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
