"""`globe export ARTIFACT --model MODEL_DIR [--dense] -o HF_DIR`: write a compressed or a dense-reconstructed checkpoint.

Without --dense: HF_DIR is a compressed checkpoint (config.json with a "globe" quantization_config, the tensors
GloBE leaves dense plus the banks): `AutoModelForCausalLM.from_pretrained(HF_DIR)` after `import globe`,
`globe.load_compressed(HF_DIR)` or `globe eval HF_DIR`. With --dense: HF_DIR is an ordinary Hugging Face
checkpoint whose routed experts are W_i = A_i tilde_B_i, loadable by stock transformers, vLLM or lm-eval.

`globe apply` is a deprecated alias of this command, kept for old scripts: it writes a checkpoint to disk, while
the Python `globe.apply_globe(model, artifact)` patches a loaded model in memory; the alias logs a warning saying
so. The export itself is globe.run.export.run_export.
"""
from __future__ import annotations

import argparse
import logging

from globe.device import DEVICES
from globe.run.config import ExportConfig
from globe.run.export import ExportRun, export_message, run_export

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", aliases=["apply"],
                       help="apply an artifact to its model and save it: compressed checkpoint, or dense with --dense",
                       description="Export a GloBE artifact applied to its model: a compressed checkpoint (dense "
                                   "tensors + artifact) or, with --dense, a dense-reconstructed Hugging Face "
                                   "checkpoint (per-expert hub keys, the source dtype). `globe apply` is a "
                                   "deprecated alias.")
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact directory written by `globe fit` (its OUT)")
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
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="device the model is loaded on and the experts reconstructed on; auto = cuda, else mps, "
                        "else cpu (default auto)")
    p.set_defaults(func=run)


APPLY_DEPRECATED = ("`globe apply` is a deprecated alias of `globe export` (it writes a checkpoint to disk; the "
                    "Python globe.apply_globe patches a model in memory): use `globe export`")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "command", None) == "apply":
        log.warning(APPLY_DEPRECATED)
    run_ = ExportRun(artifact=args.artifact, out=args.out, model=args.model, dense=args.dense,
                     max_shard_size=args.max_shard_size, device=args.device, overwrite=args.overwrite,
                     force=args.force)
    print(export_message(run_, run_export(run_)))
    return 0
