"""The recipe every evaluation-model script shares: write the corpus splits, then (for a model trained from scratch)
train, save, verify, evaluate and record it. Each train_*_moe.py script supplies its corpus glob and its model class.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

from transformers import PreTrainedModel

import build_corpus
import moe_evaluation as ev
import moe_training as mt

LOG = logging.getLogger("moe_recipe")


def build_splits(args: argparse.Namespace, glob: str | None = None) -> None:
    """Write the train / held-out / calibration splits of args.source (files matching `glob`, or the corpus
    builder's default)."""
    pattern = ["--glob", glob] if glob else []
    build_corpus.main(["--source", str(args.source), *pattern, "--train-out", str(args.train_text),
                       "--heldout-out", str(args.heldout_text), "--calib-out", str(args.out_dir / "calib.txt")])


def train_from_scratch(args: argparse.Namespace, glob: str,
                       make_model: Callable[[argparse.Namespace, int, int], PreTrainedModel]) -> None:
    """Build the corpus, train `make_model(args, vocab_size, eos_id)` from scratch, save, verify, evaluate, record."""
    t0 = mt.setup(args)
    if not args.skip_corpus:
        build_splits(args, glob)
    docs = mt.split_docs(args.train_text.read_text(encoding="utf-8"))
    tok, data = mt.prepare_tokenizer(args, docs)
    LOG.info("train split: %d documents, %d tokens", len(docs), data.numel())
    model = make_model(args, len(tok), tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2fM parameters", n_params / 1e6)
    t1 = time.time()
    stats = mt.train(model, data, args)
    record = {"parameters": n_params, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.context,
              "train_tokens": data.numel(), "train_documents": len(docs), "train_wall_s": round(time.time() - t1, 1),
              **stats}
    ev.finish(model, tok, data, args, record, t0, sharing=True)
