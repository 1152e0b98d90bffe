"""Train the evaluation model ``benchmarks/models/scratch-qwen2moe-e48``: a Qwen2-MoE trained from scratch on Perl's
documentation, with other shapes than the embedded model (48 routed experts, top-6, p=48, d=160, 4 layers).

Corpus: the POD sources of Debian's ``perl-doc`` package (``/usr/share/perl/5.36.0/pod/*.pod``, GPL-1+ or
Artistic), split by file with ``scripts/build_corpus.py``: sorted index % 20 == 7 is held out (``heldout.txt``),
== 13 is calibration (``calib.txt``), the rest trains (``corpus/perl/train.txt``, not committed). Then the
shared recipe of ``moe_training.py`` (byte-level BPE on the train split, AdamW + warmup/cosine, per-layer router
balancing loss), a bf16 save with per-expert hub keys, a bit-exact reload check, the held-out evaluation and the
expert-sharing statistics, all written to ``training.json``. Seeded; deterministic on a fixed thread count.

Rebuild (needs ``apt-get install perl-doc``; about 15 min on one thread):

    OMP_NUM_THREADS=1 python scripts/train_scratch_moe.py
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from transformers import Qwen2MoeForCausalLM

import build_corpus
import moe_evaluation as ev
import moe_training as mt

LOG = logging.getLogger("train_scratch_moe")
OUT_DIR = mt.REPO_ROOT / "benchmarks" / "models" / "scratch-qwen2moe-e48"
SOURCE = Path("/usr/share/perl/5.36.0/pod")
MODEL_DEFAULTS = {"vocab_size": 2048, "hidden_size": 160, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 48,
                  "top_k": 6, "moe_intermediate": 48, "shared_intermediate": 192}
TRAIN_DEFAULTS = {"train_text": mt.REPO_ROOT / "corpus" / "perl" / "train.txt", "heldout_text": OUT_DIR / "heldout.txt",
                  "out_dir": OUT_DIR, "steps": 450, "seed": 4321, "lr": 3e-3, "warmup": 50,
                  "aux_loss_coef": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mt.add_training_args(p, TRAIN_DEFAULTS)
    mt.add_model_args(p, MODEL_DEFAULTS)
    p.add_argument("--source", type=Path, default=SOURCE, help="directory of the *.pod sources")
    p.add_argument("--skip-corpus", action="store_true", help="reuse the existing split files")
    return p.parse_args(argv)


def build_splits(args: argparse.Namespace) -> None:
    """Write the train / held-out / calibration splits (see the module doc)."""
    build_corpus.main(["--source", str(args.source), "--glob", "*.pod", "--train-out", str(args.train_text),
                       "--heldout-out", str(args.heldout_text), "--calib-out", str(args.out_dir / "calib.txt")])


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, train, save, verify, evaluate, and record the model."""
    args = parse_args(argv)
    t0 = mt.setup(args)
    if not args.skip_corpus:
        build_splits(args)
    docs = mt.split_docs(args.train_text.read_text(encoding="utf-8"))
    tok, data = mt.prepare_tokenizer(args, docs)
    LOG.info("train split: %d documents, %d tokens", len(docs), data.numel())
    model = Qwen2MoeForCausalLM(mt.moe_config(args, len(tok), tok.eos_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2fM parameters", n_params / 1e6)
    t1 = time.time()
    stats = mt.train(model, data, args)
    record = {"parameters": n_params, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.context,
              "train_tokens": data.numel(), "train_documents": len(docs), "train_wall_s": round(time.time() - t1, 1),
              **stats}
    ev.finish(model, tok, data, args, record, t0, sharing=True)


if __name__ == "__main__":
    main()
