"""Train the evaluation model ``benchmarks/models/scratch-qwen2moe-e48``: a Qwen2-MoE trained from scratch on Perl's
documentation, with other shapes than the embedded model (48 routed experts, top-6, p=48, d=160, 4 layers).

Corpus: the POD sources of Debian's ``perl-doc`` package (``/usr/share/perl/5.36.0/pod/*.pod``, GPL-1+ or
Artistic), split by file with ``scripts/build_corpus.py``: sorted index % 20 == 7 is held out (``heldout.txt``),
== 13 is calibration (``calib.txt``), the rest trains (``corpus/perl/train.txt``, not committed). Then the
shared recipe of ``moe_training.py`` (byte-level BPE on the train split, AdamW + warmup/cosine, per-layer router
balancing loss), a bf16 save with per-expert hub keys, a bit-exact reload check, the held-out evaluation and the
expert-sharing statistics, all written to ``training.json``. Seeded; deterministic on a fixed thread count.

Rebuild (needs ``apt-get install perl-doc``; 1,800 steps, 13.5 CPU min on one thread, 32 min wall on a busy 2-core
machine):

    OMP_NUM_THREADS=1 python scripts/train_scratch_moe.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import Qwen2MoeForCausalLM

import moe_recipe as recipe
import moe_training as mt

OUT_DIR = mt.REPO_ROOT / "benchmarks" / "models" / "scratch-qwen2moe-e48"
SOURCE = Path("/usr/share/perl/5.36.0/pod")
MODEL_DEFAULTS = {"vocab_size": 2048, "hidden_size": 160, "layers": 4, "heads": 4, "kv_heads": 2, "experts": 48,
                  "top_k": 6, "moe_intermediate": 48, "shared_intermediate": 192}
TRAIN_DEFAULTS = {"train_text": mt.REPO_ROOT / "corpus" / "perl" / "train.txt", "heldout_text": OUT_DIR / "heldout.txt",
                  "out_dir": OUT_DIR, "steps": 1800, "seed": 4321, "lr": 3e-3, "warmup": 50,
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
    recipe.build_splits(args, "*.pod")


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, train, save, verify, evaluate, and record the model."""
    recipe.train_from_scratch(parse_args(argv), "*.pod",
                              lambda args, vocab, eos: Qwen2MoeForCausalLM(mt.moe_config(args, vocab, eos)))


if __name__ == "__main__":
    main()
