"""`globe info MODEL_DIR [--json]`: what a checkpoint holds, as GloBE sees it (read from headers, no model built).

Prints the architecture, MoE vs dense layers, routed experts per layer, top-k, p, d, layout, dtype, parameters
per routed family with their share of all parameters, and the groups GloBE leaves untouched. `--json` prints
`Inventory.to_dict()` instead. Without MODEL_DIR it describes the embedded default model.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from globe import assets
from globe.errors import ModelDirError
from globe.export.compressed import describe_compressed
from globe.formats.checkpoint import is_compressed
from globe.io import Inventory, open_checkpoint

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="show the routed experts and parameter inventory of a checkpoint",
        description="Inventory of a Hugging Face MoE checkpoint (config.json + safetensors): architecture, "
                    "MoE/dense layers, routed experts, top-k, p, d, layout, dtype, parameters per family and "
                    "the tensors GloBE leaves untouched. Reads safetensors headers only.")
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", default=None,
                        help="checkpoint directory (default: the embedded model, globe.assets.DEFAULT_MODEL_DIR)")
    parser.add_argument("--json", action="store_true", help="print the inventory as JSON instead of text")
    parser.add_argument("--force", action="store_true",
                        help="describe a compressed checkpoint even if its tensors do not match its recorded content "
                             "hash (warns)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir) if args.model_dir else assets.DEFAULT_MODEL_DIR
    if args.model_dir is None and not (model_dir / "config.json").is_file():
        raise ModelDirError(f"the embedded default model ({model_dir}) is not available in this install; "
                            f"pass MODEL_DIR")
    if is_compressed(model_dir):                          # a GloBE export: what it was made from, cut, families
        info = describe_compressed(model_dir, force=args.force)
        print(json.dumps(info, indent=2) if args.json else format_compressed(info))
        return 0
    log.debug("reading inventory of %s", model_dir)
    with open_checkpoint(model_dir) as reader:
        inventory = reader.inventory()
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
    else:
        print(format_inventory(inventory))
    return 0


def format_compressed(info: dict) -> str:
    """Human-readable summary of a compressed checkpoint (globe.export.describe_compressed)."""
    lines = [f"GloBE compressed checkpoint {info['path']} (format {info['format_version']}, {info['mode']} mode)",
             f"made from    {info['source']} ({info['model_type']})"]
    if info["total_cut"] is not None:
        lines.append(f"params       {info['total_params_before']:,} -> {info['total_params_after']:,} "
                     f"(total cut {100 * info['total_cut']:.2f} %), {info['bytes_on_disk']:,} bytes on disk")
    if info.get("packed_bytes"):
        lines.append(f"packed       {info['packed_bytes']:,} bytes of quantized factors (codes, scales, zeros) of the "
                     f"{info['bytes_on_disk']:,} on disk")
    for name, fam in info["families"].items():
        ranks = f" (ranks per layer {', '.join(f'{l}:{r}' for l, r in fam['ranks'].items())})" if fam.get("ranks") else ""
        lines.append(f"family {name:5} m={fam['m']} r={fam['r']}{ranks} code width {fam['k']}, phi {fam.get('phi')}, "
                     f"{fam['params']:,} / {fam['dense_params']:,} params, rel_err {fam['rel_err']:.4f}")
        if fam.get("quant"):
            lines.append("             stored packed: " + ", ".join(
                f"{part} {q['bits']}-bit group {q['group']}" + (f" ({q['method']})" if q.get("method") else "")
                for part, q in fam["quant"].items()) + " (integer codes + fp16 scales and zeros, dequantized on use)")
        elif fam.get("fit_quant"):
            lines.append("             fitted quantized: " + ", ".join(
                f"{part} {q['bits']}-bit group {q['group']}" for part, q in fam["fit_quant"].items())
                + " (stored here dequantized)")
    return "\n".join(lines)


def format_inventory(inv: Inventory) -> str:
    """Human-readable multi-line inventory."""
    total = max(inv.total_params, 1)
    n_moe = len(inv.moe_layers)
    lines = [
        f"checkpoint      {inv.model_dir}",
        f"architecture    {inv.arch} (model_type {inv.model_type})",
        f"layers          {inv.num_layers}: {n_moe} MoE [{format_ranges(inv.moe_layers)}], "
        f"{len(inv.dense_layers)} dense [{format_ranges(inv.dense_layers)}]",
        f"routed experts  {inv.num_experts} per MoE layer ({n_moe * inv.num_experts} in all), "
        f"top-k {inv.top_k if inv.top_k is not None else '?'}",
        f"expert shape    p={inv.p} (intermediate) x d={inv.d} (hidden)",
        f"storage         {inv.layout} layout, {inv.dtype}, {len(inv.shards)} shard(s)",
        "routed params (compressible: gate, up; down kept dense)",
    ]
    for family, n in inv.params.items():
        lines.append(f"  {family:<18}{n:>16,}  {100 * n / total:6.2f} %")
    lines.append(f"  {'all routed':<18}{inv.routed_params:>16,}  {100 * inv.routed_params / total:6.2f} %")
    lines.append("untouched params")
    for group, n in inv.untouched.items():
        tensors = inv.untouched_tensors.get(group, 0)
        lines.append(f"  {group:<18}{n:>16,}  {100 * n / total:6.2f} %  ({tensors} tensors)")
    lines.append(f"total params      {inv.total_params:>18,}")
    return "\n".join(lines)


def format_ranges(values: list[int]) -> str:
    """[0, 2, 3, 4, 7] -> "0, 2-4, 7"; [] -> "none"."""
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)
