"""Train the evaluation model ``benchmarks/models/mixtral-e8-top2``: a Mixtral-style MoE (8 routed experts, top-2,
top-k weights renormalised, NO shared expert, every layer MoE) trained from scratch on CMake's documentation.

Another shape and routing than the two Qwen2-MoE evaluation models (few wide experts instead of many narrow ones,
6 layers instead of 4, no shared expert to absorb what the routed experts lose) and another text.

Corpus: the reStructuredText sources of CMake 3.25's manual from Debian's ``cmake-data`` package
(``/usr/share/cmake-3.25/Help/**/*.rst``, BSD-3-Clause), split by file with ``scripts/build_corpus.py``: sorted
index % 20 == 7 is held out (``heldout.txt``), == 13 is calibration (``calib.txt``), the rest trains
(``corpus/cmake/train.txt``, not committed). Then the shared recipe of ``moe_training.py`` (byte-level BPE on the
train split, AdamW + warmup/cosine, per-layer router balancing loss), a bf16 save with per-expert hub keys
(``block_sparse_moe.experts.{e}.w1/w2/w3``), a bit-exact reload check, the held-out evaluation and the
expert-sharing statistics, all written to ``training.json``. Seeded; deterministic on a fixed thread count.

Rebuild (needs ``cmake-data``, installed with ``cmake``; about 5 CPU minutes on one thread, 13 min wall on the busy
shared 2-core machine):

    OMP_NUM_THREADS=1 python scripts/train_mixtral_moe.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import MixtralForCausalLM

import moe_recipe as recipe
import moe_training as mt

OUT_DIR = mt.REPO_ROOT / "benchmarks" / "models" / "mixtral-e8-top2"
SOURCE = Path("/usr/share/cmake-3.25/Help")
MODEL_DEFAULTS = {"vocab_size": 2048, "hidden_size": 160, "layers": 6, "heads": 4, "kv_heads": 2, "experts": 8,
                  "top_k": 2, "moe_intermediate": 256, "shared_intermediate": 0}
TRAIN_DEFAULTS = {"train_text": mt.REPO_ROOT / "corpus" / "cmake" / "train.txt",
                  "heldout_text": OUT_DIR / "heldout.txt", "out_dir": OUT_DIR, "steps": 500, "seed": 8080, "lr": 3e-3, "warmup": 40,
                  "aux_loss_coef": 0.02}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mt.add_training_args(p, TRAIN_DEFAULTS)
    mt.add_model_args(p, MODEL_DEFAULTS)
    p.add_argument("--source", type=Path, default=SOURCE, help="directory of the *.rst sources")
    p.add_argument("--skip-corpus", action="store_true", help="reuse the existing split files")
    args = p.parse_args(argv)
    if args.shared_intermediate:
        p.error("--shared-intermediate: a Mixtral model has no shared expert; leave it at 0")
    return args


def build_splits(args: argparse.Namespace) -> None:
    """Write the train / held-out / calibration splits (see the module doc)."""
    recipe.build_splits(args, "*.rst")


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, train, save, verify, evaluate, and record the model."""
    recipe.train_from_scratch(parse_args(argv), "*.rst",
                              lambda args, vocab, eos: MixtralForCausalLM(mt.mixtral_config(args, vocab, eos)))


if __name__ == "__main__":
    main()
