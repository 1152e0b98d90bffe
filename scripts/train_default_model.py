"""Train GloBE's embedded default model: a tiny Qwen2-MoE language model on Python's docs.

Steps (all seeded and deterministic on a fixed thread count):
    1. train a byte-level BPE tokenizer on ``corpus/train.txt`` (see ``scripts/build_corpus.py``);
    2. train ``Qwen2MoeForCausalLM`` from scratch (fp32, AdamW, warmup + cosine decay, router aux loss);
    3. save the model in bf16 plus the tokenizer to ``globe/assets/globe-tiny-moe``;
    4. reload the saved checkpoint, check per-expert hub keys and bit-equal logits, and evaluate it on
       ``heldout.txt``: token perplexity over non-overlapping 256-token windows, an add-one smoothed unigram
       baseline on the same target tokens, and per-layer expert utilisation;
    5. write everything to ``training.json``.

The training code is shared with the evaluation models' scripts (``moe_training.py``, ``moe_evaluation.py``).
Rebuild (about 40 min on one thread; overwrites ``globe/assets/globe-tiny-moe``):

    python scripts/build_corpus.py && python scripts/train_default_model.py
"""
from __future__ import annotations

import argparse
import logging
import time

from transformers import Qwen2MoeForCausalLM

import moe_evaluation as ev
import moe_training as mt

LOG = logging.getLogger("train_default_model")
OUT_DIR = mt.REPO_ROOT / "globe" / "assets" / "globe-tiny-moe"
MODEL_DEFAULTS = {"vocab_size": 4096, "hidden_size": 256, "layers": 6, "heads": 4, "kv_heads": 2, "experts": 16,
                  "top_k": 4, "moe_intermediate": 128, "shared_intermediate": 512}
TRAIN_DEFAULTS = {"train_text": mt.REPO_ROOT / "corpus" / "train.txt", "heldout_text": OUT_DIR / "heldout.txt",
                  "out_dir": OUT_DIR, "steps": 1400}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mt.add_training_args(p, TRAIN_DEFAULTS)
    mt.add_model_args(p, MODEL_DEFAULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, save, verify, evaluate, and record the default model."""
    args = parse_args(argv)
    t0 = mt.setup(args)
    docs = mt.split_docs(args.train_text.read_text(encoding="utf-8"))
    tok, data = mt.prepare_tokenizer(args, docs)
    LOG.info("train split: %d documents, %d tokens (%.2f bytes/token)", len(docs), data.numel(),
             args.train_text.stat().st_size / data.numel())
    model = Qwen2MoeForCausalLM(mt.moe_config(args, len(tok), tok.eos_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2fM parameters, experts implementation %s", n_params / 1e6, model.config._experts_implementation)
    t1 = time.time()
    stats = mt.train(model, data, args)
    record = {"parameters": n_params, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.context,
              "train_tokens": data.numel(), "train_documents": len(docs), "train_wall_s": round(time.time() - t1, 1),
              **stats}
    ev.finish(model, tok, data, args, record, t0)


if __name__ == "__main__":
    main()
