"""`globe export OUT --model MODEL_DIR [--dense] -o HF_DIR`: write a compressed or a dense-reconstructed checkpoint.

Without --dense: HF_DIR holds the tensors GloBE leaves dense plus the artifact (load it with
`globe.load_compressed(HF_DIR)` or `globe eval HF_DIR`). With --dense: HF_DIR is an ordinary Hugging Face checkpoint
whose routed experts are W_i = A_i tilde_B_i, loadable by stock transformers, vLLM or lm-eval.
`globe apply` is the same command (apply an artifact to its model and save the result).
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from safetensors import SafetensorError

from globe import outputs
from globe.device import DEVICES
from globe.errors import ConfigError, ModelDirError, OutputError
from globe.run_config import ExportConfig

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", aliases=["apply"],
                       help="apply an artifact to its model and save it: compressed checkpoint, or dense with --dense",
                       description="Export a GloBE artifact applied to its model: a compressed checkpoint (dense "
                                   "tensors + artifact) or, with --dense, a dense-reconstructed Hugging Face "
                                   "checkpoint (per-expert hub keys, the source dtype). `globe apply` is an alias.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory written by `globe fit`")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="checkpoint the artifact was fitted on (default: the model_dir recorded in the artifact)")
    p.add_argument("--dense", action="store_true", help="reconstruct dense experts (stock transformers checkpoint)")
    p.add_argument("-o", "--out", required=True, metavar="HF_DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty HF_DIR, replacing its files")
    p.add_argument("--force", action="store_true",
                   help="apply the artifact even if MODEL_DIR's weights differ from those it was fitted on "
                        "(same shapes; a warning is logged)")
    p.add_argument("--max-shard-size", default=ExportConfig.max_shard_size,
                   help=f"largest shard of a --dense export (default {ExportConfig.max_shard_size})")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="device the model is loaded on and the experts reconstructed on (default cpu)")
    p.set_defaults(func=run)


def model_dir_of(args: argparse.Namespace, result) -> Path:
    """--model, else the directory recorded in the artifact; ModelDirError when neither exists."""
    model = args.model or result.source.get("model_dir")
    if not model or not Path(model).is_dir():
        raise ModelDirError(f"model directory {model!r} not found; pass --model MODEL_DIR (the checkpoint the "
                            f"artifact was fitted on)")
    return Path(model)


SHARD_SIZE = re.compile(r"^\s*([1-9]\d*)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)


def shard_size(value: str) -> str | int:
    """--max-shard-size as transformers takes it ("5GB", "500MiB", or bytes); ConfigError otherwise."""
    match = SHARD_SIZE.match(str(value))
    if match is None:
        raise ConfigError(f"--max-shard-size {value!r} is not a size: pass an integer with a unit, e.g. 5GB or 500MB")
    return int(match[1]) if match[2] is None else f"{match[1]}{match[2].upper()}"


def run(args: argparse.Namespace) -> int:
    from globe.artifact import check_compatible, load
    args.max_shard_size = shard_size(args.max_shard_size)
    result = load(args.artifact)
    model_dir = model_dir_of(args, result)
    check_compatible(result, model_dir, force=args.force)
    out_dir = Path(args.out)
    with outputs.claim_output_dir(out_dir, "export", args.overwrite, what="export", inputs=[model_dir, args.artifact]):
        try:
            return _export(args, result, model_dir)
        except SafetensorError as exc:                     # transformers' writer: disk full, ...
            raise OutputError(f"cannot write the export into {out_dir}: {exc}") from None


def _export(args: argparse.Namespace, result, model_dir: Path) -> int:
    from globe.device import resolve_device
    from globe.export import export_dense, load_model, save_compressed
    from globe.export.files import move_tree_files, staging_dir
    device = resolve_device(args.device)
    model = load_model(model_dir, device=None if device.type == "cpu" else str(device))   # the checkpoint's dtype
    if args.dense:
        out = export_dense(model, result, args.out, max_shard_size=args.max_shard_size)
        print(f"dense checkpoint written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    else:
        with staging_dir(Path(args.out)) as staging:        # all files written first: a failure keeps the old ones
            save_compressed(model, result, staging)
            move_tree_files(Path(staging), Path(args.out))
        print(f"compressed checkpoint written to {args.out} (load it with globe.load_compressed or "
              f"`globe eval {args.out}`)")
    return 0
