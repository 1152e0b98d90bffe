"""Model card (README.md) of an export: source, method, calibration, config, per-family metrics, params and bytes,
evaluation (perplexity, KL and top-1 agreement to the original), command.

    write_model_card("compressed/", result, command="globe compress ...", evaluation=report)

It describes what is in the directory for a reader on the hub or on disk, and how to load it; the same facts are
in globe_config.json for programs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from globe.core.files import atomic_write_text
from globe.core.result import FitResult
from globe.formats.checkpoint import PACKED_BUFFERS, STATE_KINDS


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _metrics_table(result: FitResult) -> list[str]:
    aware = any("act_rel_err" in fam.metrics for fam in result.families.values())
    rows = ["| family | m | r | stored / dense params | rel_err (weights) |"
            + (" rel_err (activation-weighted, minimised) |" if aware else "") + " median support |",
            "|---|---|---|---|---|---|" + ("---|" if aware else "")]
    for name, fam in result.families.items():
        m, params = fam.metrics, fam.param_count()
        act = f" {m['act_rel_err']:.4f} |" if "act_rel_err" in m else (" - |" if aware else "")
        r = fam.shape["r"] if fam.ranks is None else f"{fam.shape['r']} (per layer {'/'.join(map(str, fam.ranks))})"
        rows.append(f"| {name} | {fam.shape['m']} | {r} | {params['stored']:,} / {params['dense']:,} "
                    f"({params['stored'] / params['dense']:.3f}) | {m.get('rel_err', float('nan')):.4f} |{act} "
                    f"{m.get('median_support', float('nan')):.1f} |")
    return rows


def _calibration(result: FitResult) -> list[str]:
    """Where the activation statistics of the fit came from, and the options of the activation-aware fit."""
    info = result.source.get("calibration")
    if not info:
        return []
    kind, act = info.get("source"), result.config.activation
    if kind == "self-generated":
        what = (f"{info['tokens']:,} tokens the model generated itself (data-free): {info.get('length', '?')}-token "
                f"sequences sampled at temperature {info['temperature']:g} from {info.get('start', 'its BOS token')}, "
                f"seed {info['seed']}")
    elif kind == "text":
        what = f"the first {info['tokens']:,} tokens of `{info['text']}`"
        if info.get("self_generated"):                 # mixed calibration (--calibration-mix)
            own = info["self_generated"]
            what += (f" and {own['tokens']:,} tokens the model generated itself ({own.get('length', '?')}-token "
                     f"sequences at temperature {own['temperature']:g}, seed {own['seed']}), interleaved by window")
    elif kind == "statistics file":
        what = f"the statistics file `{info['stats']}`"
    else:
        return ["", "## Calibration", "", "None: the fit minimised the weights' own (Frobenius) error."]
    options = (f"per-expert second moments blended with the layer's ({act.prior_tokens:g} tokens prior), damping "
               f"{act.damp:g}, {act.steps} activation-aware refinement steps, routing weights "
               f"{'on' if act.routing_weights else 'off'}, channel weights {'on' if act.channel_weights else 'off'}"
               if act.per_expert else f"per-layer second moments, damping {act.damp:g}, {act.steps} refinement steps")
    return ["", "## Calibration", "", f"Activation-aware fit (minimising the error of the experts' outputs on their "
            f"inputs) calibrated on {what}; {options}.", *_sensitivity(result), *_expert_phase(result),
            *_distillation(result)]


def _sensitivity(result: FitResult) -> list[str]:
    """The sensitivity probe (globe.calibration.sensitivity) and the per-layer weights the fit gave its objectives."""
    probe = (result.source.get("calibration") or {}).get("sensitivity")
    if not probe:
        return []
    if not result.config.activation.sensitivity:
        return ["", f"Sensitivity probe measured ({probe['seconds']:g} s) but not used (`--sensitivity off`)."]
    weights = {f: fam.metrics["sensitivity"]["weights"] for f, fam in result.families.items()
               if "sensitivity" in fam.metrics}
    expert = next((fam.metrics["expert_sensitivity"]["weights"] for fam in result.families.values()
                   if "expert_sensitivity" in fam.metrics), None)
    shown = "; ".join(f"{f} {', '.join(f'{w:.2f}' for w in ws)}" for f, ws in weights.items())
    return ["", f"Layers weighted by what the model feels (sensitivity probe, {probe['seconds']:g} s on "
                f"{probe['tokens']:,} calibration tokens: the KL of each layer's gate / up perturbed by a fixed "
                f"{probe['error']:g} relative whitened error, per unit of the fit's own error of it): per-layer weights "
                f"of the activation-aware objective {shown or '-'}"
                + (f"; of the whole-expert objective {', '.join(f'{w:.2f}' for w in expert)}" if expert else "") + "."]


def _expert_phase(result: FitResult) -> list[str]:
    """What the whole-expert phase (globe.fit.engine.expert) did, in one paragraph; off: one line saying so."""
    if "gate" not in result.families or "up" not in result.families:
        return []
    info = result.families["gate"].metrics.get("expert")
    if not info:
        return ["", "Whole-expert phase: off (gate and up fitted each on its own objective)."]
    outcome = (f"step {info['best_step']} kept" if info.get("accepted") else "no step was better: the fit is kept")
    return ["", f"Whole-expert phase: gate and up refined together for {info['steps']} Adam steps on the routed "
            f"expert's output down(act(gate x) * (up x)), {info['samples_per_expert']} routed tokens per expert; "
            f"output error ({info['selected_on']}) {info['error_before']:.5f} -> {info['error_after']:.5f}, "
            f"{outcome}.{_quant_expert_phase(result)}"]


def _quant_expert_phase(result: FitResult) -> str:
    """What the quantized expert phase (globe.fit.engine.quant_expert) did, one sentence ('' when it did not run)."""
    info = result.families["gate"].metrics.get("quant_expert")
    if not info:
        return ""
    outcome = (f"step {info['best_step']} kept" if info.get("accepted") else "no step was better: kept as quantized")
    return (f" After quantization, the float parts of the quantized factors (group scales and zeros, code values; "
            f"integer codes fixed) trained {info['steps']} Adam steps on the same output: error "
            f"{info['error_before']:.5f} -> {info['error_after']:.5f}, {outcome}.")


def _distillation(result: FitResult) -> list[str]:
    """What the distillation after the fit (globe.tune.distill) did, in one paragraph."""
    info = result.source.get("distill")
    if not info or "config" not in info:
        return []
    cfg, kl = info["config"], ""
    if info.get("validation_kl_before") is not None:
        kl = (f"; KL to the original on {info['validation_sequences']} held-out calibration sequences "
              f"{info['validation_kl_before']:.6f} -> {info['validation_kl_after']:.6f}")
    outcome = ("kept (the factors above are the distilled ones; the weight errors in the table are the fit's)"
               if info.get("accepted") else "rejected: the fit is stored as it was")
    return ["", f"Then distilled ({', '.join(info['trained'])}; nothing else of the model) to the original's next-token "
                f"distribution on the same calibration tokens: {cfg['steps']} Adam steps, step {cfg['lr']:g} x each "
                f"factor's RMS, top-{cfg['top_k']} log-probs, seed {cfg['seed']}{kl}; {outcome}."]


def tensor_bytes(path: Path) -> dict[str, int]:
    """{key: stored bytes} of every tensor of a directory's *.safetensors files, from their headers."""
    sizes: dict[str, int] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                      if k != "__metadata__"})
    return sizes


def _part_key(key: str) -> str:
    """The part a stored key belongs to: `x.bank.gate` for `x.bank.gate.codes` (a packed part's tensor)."""
    head, _, tail = key.rpartition(".")
    return head if tail in PACKED_BUFFERS else key


def family_bytes(result: FitResult, out: Path) -> dict[str, tuple[int | None, int]]:
    """{family: (dense bytes in the source checkpoint or None, bytes of its GloBE tensors in `out`)}."""
    inv = result.source.get("inventory") or {}
    dtype = getattr(torch, str(inv.get("dtype") or "").removeprefix("torch."), None)
    width = torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    sizes = tensor_bytes(out)
    rows = {}
    for fam in result.families:
        stored = sum(n for k, n in sizes.items() if any(f".{_part_key(k)}".endswith(f".{kind}.{fam}")
                                                       for kind in STATE_KINDS))
        dense = result.params[f"dense_{fam}"] * width if width else None
        rows[fam] = (dense, stored)
    return rows


def _size_table(result: FitResult, out: Path) -> list[str]:
    inv = result.source.get("inventory") or {}
    total = inv.get("total_params")
    saved = sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families)
    rows = ["| | before | after | ratio |", "|---|---|---|---|"]
    if total:
        rows.append(f"| parameters (whole model) | {total:,} | {total - saved:,} | {(total - saved) / total:.3f} |")
    src = result.source.get("model_dir")
    if src and Path(src).is_dir():
        before, after = _disk_bytes(Path(src)), _disk_bytes(out)
        rows.append(f"| bytes on disk (safetensors) | {before:,} | {after:,} | {after / before:.3f} |")
    rows += _byte_model_rows(result)
    rows += _memory_rows(out)
    quant = {n: f.quant for n, f in result.families.items() if f.quant}
    if quant:
        rows += ["", "The fit quantized " + ", ".join(
            f"{n} ({', '.join(f'{part} {qt.bits}-bit group {qt.group}' for part, qt in q.items())})"
            for n, q in quant.items()) + "; this checkpoint stores them packed (integer codes + fp16 scales and "
            "zeros), and the runtime dequantizes them on use."]
    return rows


def _byte_model_rows(result: FitResult) -> list[str]:
    """Bytes before (routed experts in the source dtype) and after (as GloBE stores them: packed bank and adapters
    with their group scales, sparse codes, expert scales and ids), per family and for all tensors, by the byte
    model (globe.fit.planning.bytes.result_bytes)."""
    from globe.fit.planning.bytes import result_bytes
    b = result_bytes(result)
    if b is None:
        return []
    rows = []
    for name, fam in b["families"].items():
        bits = 8 * fam["stored"] / (fam["dense"] / b["value_bytes"])
        rows.append(f"| bytes of {name} (routed experts) | {fam['dense']:,} | {fam['stored']:,} | "
                    f"{fam['stored'] / fam['dense']:.3f} ({bits:.2f} bits per weight) |")
        rows.append(f"| bytes of {name}: {' / '.join(fam['parts'])} | | "
                    f"{' / '.join(f'{v:,}' for v in fam['parts'].values())} | |")
    dense = sum(f["dense"] for f in b["families"].values())
    stored = sum(f["stored"] for f in b["families"].values())
    rows.append(f"| bytes of the compressed families | {dense:,} | {stored:,} | {stored / dense:.3f} |")
    rows.append(f"| bytes of all tensors (byte model) | {b['before']:,} | {b['after']:,} | "
                f"{b['after'] / b['before']:.3f} |")
    size = result.source.get("size")
    if size:
        rows.append(f"| size target (`--size`) | | {size['target_bytes']:,} | |")
        if size.get("kind"):
            from globe.fit.planning.bytes import SizePlan
            what = SizePlan.from_dict(size).describe()
            rows.append(f"| chosen for `--size` ({size['bits_per_weight']:.2f} bits per routed weight) | | {what} | |")
        for c in (size.get("choice") or {}).get("candidates", []):      # the kinds built and their measured KL
            stored = f"{c['bytes']:,} bytes, " if c.get("bytes") else ""
            rows.append(f"| `--size` candidate: {c['describe']} | | {stored}KL {c['kl']:.6g} on "
                        f"held-out calibration tokens | {'chosen' if c['kind'] == size['choice']['chosen'] else ''} |")
    return rows


def _memory_rows(out: Path) -> list[str]:
    """Memory when loaded: the stored tensors (weights) and, in the default cached mode, the cache budget that
    quantization_config allows; framework overhead (Python, torch, transformers) comes on top, see globe eval."""
    from globe.formats.checkpoint import read_quant
    weights = sum(tensor_bytes(out).values())
    quant = read_quant(out) or {}
    cache = quant.get("cache_bytes")
    if not weights:
        return []
    row = f"| memory when loaded: weights | | {weights:,} | |"
    packed = sum(n for k, n in tensor_bytes(out).items() if _part_key(k) != k)
    if packed:
        row += (f"\n| memory when loaded: of the weights, packed quantized factors (dequantized on use; the cache "
                f"holds dequantized ones) | | {packed:,} | |")
    if quant.get("mode") == "cached" and isinstance(cache, int):
        row += f"\n| memory when loaded: cache (at most, `{quant['mode']}` mode) | | {cache:,} | |"
    return [row, "| memory when loaded: framework (Python, torch, transformers) | | see `globe eval` | |"]


def _evaluation(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return []
    lines = ["", "## Evaluation", "",
             "KL(original || compressed) in nats per token and top-1 agreement (how often both models' most likely "
             "next token is the same), on the same windows as the perplexity.", "",
             "| model | KL to the original | top-1 agreement | perplexity | tokens | decode tok/s | bytes held |",
             "|---|---|---|---|---|---|---|"]
    for name, rep in evaluation.items():
        ppl, speed, fp, div = rep["perplexity"], rep.get("speed", {}), rep["footprint"], rep.get("divergence")
        decode = f"{speed['decode_tok_s']:.1f}" if "decode_tok_s" in speed else "-"
        kl, top1 = (f"{div['kl']:.5f}", f"{div['top1']:.4f}") if div else ("-", "-")
        lines.append(f"| {name} | {kl} | {top1} | {ppl['perplexity']:.4f} | {ppl['tokens']:,} | {decode} | "
                     f"{fp['model_bytes']:,} |")
    return lines


def unusual_experts(result: FitResult) -> dict[str, dict[str, list[str]]]:
    """Per family, the experts stored trivially: "dead" (all-zero in the source: zero adapters, exact),
    "duplicate" (the same codes and adapters as an earlier expert: the source held copies) and "unreached" (no
    calibration token reached them: fitted in weight space, recorded by the fit in metrics["unreached"])."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, fam in result.families.items():
        label = [f"L{int(layer)}E{int(e)}" for layer, e in fam.ids.tolist()]
        dead = [label[i] for i in range(fam.adapters.shape[0]) if not bool(fam.adapters[i].any())]
        seen: dict[bytes, str] = {}
        dup = []
        for i in range(fam.adapters.shape[0]):
            if label[i] in dead:
                continue
            key = fam.adapters[i].float().numpy().tobytes() + fam.codes[i].float().numpy().tobytes()
            if key in seen:
                dup.append(f"{label[i]} (= {seen[key]})")
            else:
                seen[key] = label[i]
        unreached = [e for e in fam.metrics.get("unreached") or [] if isinstance(e, str)]
        if dead or dup or unreached:
            out[name] = {"dead": dead, "duplicate": dup, "unreached": unreached}
    return out


def _unusual(result: FitResult) -> list[str]:
    found = unusual_experts(result)
    if not found:
        return []
    lines = ["", "## Unusual experts", "",
             "Experts of the source stored trivially (L = layer, E = expert): all-zero (dead) experts get zero "
             "adapters and reconstruct exactly to zero; duplicated experts get the same codes and adapters as the "
             "expert they copy; experts no calibration token reaches (unreached) are fitted in weight space "
             "instead of the activation-weighted objective.", ""]
    for name, kinds in found.items():
        for kind, where in kinds.items():
            if where:
                lines.append(f"- {name}, {kind}: {', '.join(where[:20])}{' ...' if len(where) > 20 else ''}")
    return lines


def _config(result: FitResult) -> dict:
    """The fit config as recorded, the calibration statistics named by where they came from (the file of a
    compress run is deleted once the fit is done)."""
    cfg = result.config.to_dict()
    info = result.source.get("calibration") or {}
    if cfg.get("activation", {}).get("stats") and info.get("source") in ("self-generated", "text"):
        cfg["activation"]["stats"] = f"(statistics of the run's calibration: {info['source']}, see Calibration)"
    return cfg


def model_card(result: FitResult, out: Path, command: str | None = None, evaluation: dict | None = None,
               dense_dir: str | None = None, shown: Path | None = None) -> str:
    """The README.md text of a compressed export in `out` (named `shown` in the text: where it will live when
    `out` is the staging directory of the export)."""
    files, out = out, shown or out
    src = result.source.get("model_dir", "?")
    cfg = _config(result)
    lines = ["---", "library_name: transformers", "tags: [globe, moe, compression]", "---", "",
             f"# GloBE-compressed {Path(str(src)).name}", "",
             f"Source: `{src}` ({result.source.get('model_type', '?')}).", "",
             "Method: GloBE (Global-Basis Experts). Every routed expert's projection of the families below, across all "
             "layers, is W_i = A_i phi(sum_j alpha_ij B_j): one shared bank B per family (stored once), sparse codes "
             "alpha and a per-expert adapter A_i. Shared experts, routers, attention and dense layers are untouched.",
             "", "## Load", "", "```python", "import globe, torch", "from transformers import AutoModelForCausalLM",
             f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.bfloat16)   # after `import globe`",
             "```", "", "## Families", "", *_metrics_table(result), *_unusual(result), *_calibration(result), "",
             "## Size", "", *_size_table(result, files)]
    lines += _evaluation(evaluation)
    if dense_dir:
        lines += ["", f"A dense-reconstructed checkpoint (stock transformers, no globe needed) is in `{dense_dir}`."]
    lines += ["", "## Config", "", "```json", json.dumps(cfg, indent=1), "```"]
    if command:
        lines += ["", "## Command", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def write_model_card(out: str | Path, result: FitResult, command: str | None = None,
                     evaluation: dict | None = None, dense_dir: str | None = None, shown: Path | None = None
                     ) -> Path:
    path = Path(out) / "README.md"
    atomic_write_text(path, model_card(result, Path(out), command, evaluation, dense_dir, shown))
    return path
