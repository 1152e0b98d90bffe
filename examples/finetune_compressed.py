"""Recovery fine-tuning of a compressed model: train only the GloBE factors (banks, code values, adapters) to
match the original model's next-token distribution on text, and watch the KL to the original go down.

    python examples/finetune_compressed.py                                      # compresses the embedded model
    python examples/finetune_compressed.py --compressed small --model MODEL_DIR --text train.txt --out tuned
    python examples/finetune_compressed.py --steps 20 --m 8 --r 16 --am-iters 2 --varpro-steps 5   # seconds

A compressed checkpoint loads as an ordinary trainable model (`globe.load_compressed` or transformers'
`from_pretrained`); every parameter trains like any model's, the runtime caches follow the weights, and
`save_pretrained` writes what was trained in the same compressed format.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

import globe
from globe.assets import DEFAULT_MODEL_DIR
from globe.eval.perplexity import encode_text
from globe.export import load_model
from globe.run.tokenizer import load_tokenizer

FACTORS = (".bank.", ".code_values.", ".adapters.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="the original checkpoint")
    p.add_argument("--compressed", help="its compressed checkpoint (default: compress it here, into --work)")
    p.add_argument("--work", default="runs/finetune", help="where the compressed checkpoint is written if needed")
    p.add_argument("--text", default=str(DEFAULT_MODEL_DIR / "heldout.txt"),
                   help="training text; its last quarter is held out for the KL")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--window", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--out", help="save the fine-tuned compressed checkpoint here")
    p.add_argument("--m", type=int, default=8, help="atoms per bank when compressing here")
    p.add_argument("--r", type=int, default=16, help="adapter rank when compressing here")
    p.add_argument("--am-iters", type=int, default=2, help="AM iterations when compressing here")
    p.add_argument("--varpro-steps", type=int, default=5, help="VarPro steps when compressing here")
    return p.parse_args()


def compress(args: argparse.Namespace) -> Path:
    cfg = globe.FitConfig()
    cfg.bank.m, cfg.bank.r = args.m, args.r
    cfg.train.am_iters, cfg.train.varpro_steps = args.am_iters, args.varpro_steps
    out = Path(args.work) / "compressed"
    return globe.save_compressed(args.model, globe.fit_model(args.model, cfg), out)


def windows(ids: torch.Tensor, size: int) -> torch.Tensor:
    n = ids.numel() // size
    return ids[:n * size].view(n, size)                                        # [n, size]


def kl_to(reference: torch.Tensor, model, batch: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(original || model) over a batch [b, T], from the original's logits [b, T, V]."""
    logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
    return F.kl_div(logp, F.log_softmax(reference.float(), dim=-1), log_target=True, reduction="batchmean") \
        / batch.shape[1]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    path = Path(args.compressed) if args.compressed else compress(args)
    tokenizer = load_tokenizer(args.model)
    ids = windows(encode_text(tokenizer, Path(args.text).read_text(encoding="utf-8")), args.window)
    split = max(1, len(ids) * 3 // 4)
    train, held = ids[:split], ids[split:][:8]
    original = load_model(args.model, torch.float32).eval()
    model = globe.load_compressed(path, mode="factored", dtype=torch.float32)
    for name, param in model.named_parameters():                               # only the compressed parts
        param.requires_grad_(param.is_floating_point() and any(f in name for f in FACTORS))
    with torch.no_grad():
        targets = original(input_ids=held, use_cache=False).logits
        before = kl_to(targets, model, held).item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch,), generator=gen)]
        with torch.no_grad():
            reference = original(input_ids=batch, use_cache=False).logits
        loss = kl_to(reference, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = kl_to(targets, model, held).item()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"fine-tuned {trained:,} GloBE parameters for {args.steps} steps on {len(train)} windows of {args.window} "
          f"tokens")
    print(f"held-out KL to the original: before {before:.5f} after {after:.5f}")
    if args.out:
        model.save_pretrained(args.out)
        print(f"fine-tuned compressed checkpoint written to {args.out}")


if __name__ == "__main__":
    main()
