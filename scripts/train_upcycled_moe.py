"""Train the evaluation model ``benchmarks/models/upcycled-qwen2moe``: a Qwen2-MoE upcycled from a dense model the
way Qwen1.5-MoE was (see ``moe_upcycling.py``), on Python 3.11's documentation.

Steps (seeded; deterministic on a fixed thread count):
    1. corpus: ``scripts/build_corpus.py`` on Debian's ``python3.11-doc`` sources, split by file: index % 20 == 7
       held out (``heldout.txt``, the same files as the embedded model's), == 13 calibration (``calib.txt``),
       the rest trains (``corpus/upcycled/train.txt``, not committed); byte-level BPE on the train split;
    2. train the dense twin (every layer a plain FFN of width ``--shared-intermediate``) for ``--dense-steps``;
    3. upcycle: the dense FFN, shuffled along its intermediate dimension, is cut into shards of
       ``--moe-intermediate`` neurons, copied into the routed experts (expert e from shard e % shards) with a
       ``--reinit-fraction`` of each expert's entries re-initialised; the dense FFN becomes the shared expert;
    4. continue training the MoE for ``--steps`` (fresh AdamW, warmup + cosine), then save in bf16, verify,
       evaluate and measure expert sharing (also right after upcycling), all written to ``training.json``.

The dense stage runs on the same shared recipe (``moe_training.py``) with the router loss off (no routers).

Rebuild (about 15 CPU minutes on one thread; 49 min wall on the busy shared 2-core machine):

    OMP_NUM_THREADS=1 python scripts/train_upcycled_moe.py
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2MoeForCausalLM

import build_corpus
import moe_evaluation as ev
import moe_recipe as recipe
import moe_training as mt
from moe_upcycling import dense_config, upcycle

LOG = logging.getLogger("train_upcycled_moe")
OUT_DIR = mt.REPO_ROOT / "benchmarks" / "models" / "upcycled-qwen2moe"
MODEL_DEFAULTS = {"vocab_size": 2048, "hidden_size": 192, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 32,
                  "top_k": 4, "moe_intermediate": 64, "shared_intermediate": 256}
TRAIN_DEFAULTS = {"train_text": mt.REPO_ROOT / "corpus" / "upcycled" / "train.txt",
                  "heldout_text": OUT_DIR / "heldout.txt", "out_dir": OUT_DIR, "steps": 1000, "seed": 2024,
                  "lr": 2e-3, "warmup": 30}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mt.add_training_args(p, TRAIN_DEFAULTS)
    mt.add_model_args(p, MODEL_DEFAULTS)
    a = p.add_argument
    a("--dense-steps", type=int, default=1000, help="steps of the dense model before upcycling")
    a("--dense-lr", type=float, default=3e-3, help="peak learning rate of the dense stage")
    a("--reinit-fraction", type=float, default=0.5, help="share of each expert's entries re-initialised")
    a("--source", type=Path, default=build_corpus.DEFAULT_SOURCE, help="directory of the *.rst.txt sources")
    a("--skip-corpus", action="store_true", help="reuse the existing split files")
    return p.parse_args(argv)


def build_splits(args: argparse.Namespace) -> None:
    """Write the train / held-out / calibration splits (see the module doc)."""
    recipe.build_splits(args)


def train_dense(args: argparse.Namespace, data: torch.Tensor, tok: Any) -> tuple[Qwen2MoeForCausalLM, dict]:
    """Train the dense twin; return it and its loss statistics (with its wall time)."""
    cfg = dense_config(mt.moe_config(args, len(tok), tok.eos_token_id), args.shared_intermediate)
    dense = Qwen2MoeForCausalLM(cfg)
    dense_args = copy.copy(args)
    dense_args.steps, dense_args.lr = args.dense_steps, args.dense_lr
    t = time.time()
    stats = mt.train(dense, data, dense_args, desc="dense")
    stats["train_wall_s"] = round(time.time() - t, 1)
    stats["parameters"] = sum(p.numel() for p in dense.parameters())
    return dense, stats


def sharing_of(model: Qwen2MoeForCausalLM) -> dict[str, Any]:
    """Expert-sharing statistics of an in-memory MoE model (saved to a temporary bf16 checkpoint to read)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp)
        return ev.expert_sharing(Path(tmp))


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, train dense, upcycle, train the MoE, save, verify, evaluate, and record."""
    args = parse_args(argv)
    t0 = mt.setup(args)
    if not args.skip_corpus:
        build_splits(args)
    docs = mt.split_docs(args.train_text.read_text(encoding="utf-8"))
    tok, data = mt.prepare_tokenizer(args, docs)
    LOG.info("train split: %d documents, %d tokens", len(docs), data.numel())
    dense, dense_stats = train_dense(args, data, tok)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model, _ = upcycle(dense, mt.moe_config(args, len(tok), tok.eos_token_id), args.reinit_fraction, gen)
    at_upcycle = sharing_of(model)
    LOG.info("expert sharing right after upcycling: %s", at_upcycle["mean_over_layers"])
    n_params = sum(p.numel() for p in model.parameters())
    moe_args = copy.copy(args)
    moe_args.seed = args.seed + 2      # other training windows than the dense stage
    t1 = time.time()
    stats = mt.train(model, data, moe_args, desc="moe")
    record = {"parameters": n_params, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.context,
              "train_tokens": data.numel(), "train_documents": len(docs), "train_wall_s": round(time.time() - t1, 1),
              **stats, "dense_stage": dense_stats, "expert_sharing_right_after_upcycling": at_upcycle}
    ev.finish(model, tok, data, args, record, t0, sharing=True)


if __name__ == "__main__":
    main()
