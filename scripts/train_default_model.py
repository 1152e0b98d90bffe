"""Train GloBE's embedded default model: a tiny Qwen2-MoE language model on Python's docs.

Steps (all seeded and deterministic on a fixed thread count):
    1. train a byte-level BPE tokenizer on ``corpus/train.txt`` (see ``scripts/build_corpus.py``);
    2. train ``Qwen2MoeForCausalLM`` from scratch (fp32, AdamW, warmup + cosine decay, router aux loss);
    3. save the model in bf16 plus the tokenizer to ``globe/assets/globe-tiny-moe``;
    4. reload the saved checkpoint, check per-expert hub keys and bit-equal logits, and evaluate it on
       ``heldout.txt``: token perplexity over non-overlapping 256-token windows, an add-one smoothed unigram
       baseline on the same target tokens, and per-layer expert utilisation;
    5. write everything to ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

LOG = logging.getLogger("train_default_model")
REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "globe" / "assets" / "globe-tiny-moe"
EOT = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults are the values used for the committed model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--train-text", type=Path, default=REPO_ROOT / "corpus" / "train.txt", help="training split")
    a("--heldout-text", type=Path, default=OUT_DIR / "heldout.txt", help="held-out split for evaluation")
    a("--out-dir", type=Path, default=OUT_DIR, help="where the model, tokenizer and training.json go")
    a("--seed", type=int, default=1234, help="seed for torch and the data-sampling generator")
    a("--threads", type=int, default=1, help="torch / tokenizers CPU threads")
    a("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    a("--hidden-size", type=int, default=256, help="model width")
    a("--layers", type=int, default=6, help="decoder layers (all MoE)")
    a("--heads", type=int, default=4, help="attention heads")
    a("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    a("--experts", type=int, default=16, help="routed experts per layer")
    a("--top-k", type=int, default=4, help="routed experts per token")
    a("--moe-intermediate", type=int, default=128, help="routed expert intermediate size")
    a("--shared-intermediate", type=int, default=512, help="shared expert intermediate size")
    a("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss coefficient (per layer)")
    a("--context", type=int, default=256, help="training / evaluation window in tokens")
    a("--batch-size", type=int, default=8, help="sequences per step")
    a("--steps", type=int, default=1400, help="optimizer steps")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    a("--warmup", type=int, default=100, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--log-every", type=int, default=50, help="log the running loss every N steps")
    return p.parse_args(argv)


def split_docs(text: str) -> list[str]:
    """Split corpus text into documents at the end-of-text separator lines."""
    return [d.strip("\n") for d in text.split(f"\n{EOT}\n") if d.strip()]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer on the given documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer, max_len: int) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizer as a ``transformers`` fast tokenizer (EOS = BOS = PAD = ``<|endoftext|>``)."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=max_len, clean_up_tokenization_spaces=False)


def encode_docs(encode: Callable[[list[str]], list[list[int]]], docs: list[str], eos_id: int) -> torch.Tensor:
    """Encode documents and join them into one stream, with ``eos_id`` between documents."""
    ids: list[int] = []
    for i, doc_ids in enumerate(encode(docs)):
        if i:
            ids.append(eos_id)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def build_config(args: argparse.Namespace, vocab: int, eos_id: int) -> Qwen2MoeConfig:
    """The Qwen2-MoE configuration of the default model."""
    return Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=args.shared_intermediate, intermediate_size=args.shared_intermediate,
        max_position_embeddings=2 * args.context, tie_word_embeddings=True, output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef, decoder_sparse_step=1, norm_topk_prob=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (decay on matrices only) with linear warmup then cosine decay to ``min_lr_ratio``."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def sample_batch(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``ctx``-token windows of the training stream."""
    starts = torch.randint(0, data.numel() - ctx, (batch,), generator=gen)
    return torch.stack([data[s:s + ctx] for s in starts.tolist()])


def losses(model: Qwen2MoeForCausalLM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Next-token cross-entropy and the router load-balancing loss, averaged over layers.

    ``transformers`` pools all layers' router statistics per expert index before balancing, which lets single
    layers stay unbalanced; balancing each layer separately (then averaging) keeps every layer's experts in use.
    The value is ``top_k`` for perfectly balanced routing."""
    out = model(input_ids=x, output_router_logits=True, use_cache=False)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    cfg = model.config
    aux = torch.stack([load_balancing_loss_func((r,), cfg.num_experts, cfg.num_experts_per_tok)
                       for r in out.router_logits]).mean()
    return lm, aux, out.router_logits


def routing_shares(router_logits: tuple, top_k: int) -> torch.Tensor:
    """[layers, experts] share of the top-k routing slots taken by each expert."""
    counts = torch.stack([torch.bincount(r.detach().float().topk(top_k, dim=-1).indices.flatten(),
                                         minlength=r.shape[-1]) for r in router_logits]).double()
    return counts / counts.sum(dim=1, keepdim=True)


def train(model: Qwen2MoeForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Run the training loop; return loss statistics."""
    gen = torch.Generator().manual_seed(args.seed)
    opt, sched = make_optimizer(model, args)
    model.train()
    lm_hist: list[float] = []
    aux_hist: list[float] = []
    bar = tqdm(range(args.steps), desc="train", mininterval=30)
    for step in bar:
        x = sample_batch(data, args.batch_size, args.context, gen)
        lm, aux, router_logits = losses(model, x)
        (lm + args.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lm_hist.append(lm.item())
        aux_hist.append(aux.item())
        bar.set_postfix(loss=f"{lm_hist[-1]:.3f}", refresh=False)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            share = routing_shares(router_logits, model.config.num_experts_per_tok)
            LOG.info("step %d/%d lm_loss(avg %d) %.4f aux %.4f lr %.2e expert share min %.3f max %.3f",
                     step + 1, args.steps, args.log_every, sum(lm_hist[-args.log_every:]) / len(lm_hist[-args.log_every:]),
                     aux_hist[-1], sched.get_last_lr()[0], share.min().item(), share.max().item())
    tail = lm_hist[-50:]
    return {"final_train_lm_loss_last_step": lm_hist[-1], "final_train_lm_loss_mean_last_50": sum(tail) / len(tail),
            "final_router_aux_loss": aux_hist[-1], "loss_every_50_steps": lm_hist[::50]}


def unigram_logprobs(train_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probabilities of an add-one smoothed unigram model estimated on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double()
    return torch.log((counts + 1) / (counts.sum() + vocab))


@torch.no_grad()
def evaluate(model: Qwen2MoeForCausalLM, ids: torch.Tensor, ctx: int, uni_logp: torch.Tensor) -> dict[str, Any]:
    """Perplexity over non-overlapping ``ctx`` windows (first token of each window is context only),
    the unigram baseline on the same targets, and per-layer expert utilisation over all held-out tokens."""
    model.eval()
    cfg = model.config
    nll, uni_nll, n = 0.0, 0.0, 0
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
    for s in range(0, ids.numel() - 1, ctx):
        x = ids[s:s + ctx].unsqueeze(0)
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        nll += F.cross_entropy(out.logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
        uni_nll += -uni_logp[x[0, 1:]].sum().item()
        n += x.shape[1] - 1
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=cfg.num_experts)
    frac = counts.double() / counts.sum(dim=1, keepdim=True)
    return {"window": ctx, "windows": "non-overlapping", "scored_tokens": n, "heldout_tokens": ids.numel(),
            "loss": nll / n, "perplexity": math.exp(nll / n), "unigram_perplexity": math.exp(uni_nll / n),
            "expert_utilisation": {"definition": "share of top-k routing slots per expert (uniform = 1/E)",
                                   "per_layer": [[round(v, 4) for v in row] for row in frac.tolist()],
                                   "min": frac.min().item(), "max": frac.max().item(),
                                   "unused_experts": int((counts == 0).sum())}}


def check_checkpoint(out_dir: Path, cfg: Qwen2MoeConfig) -> dict[str, Any]:
    """Check the saved safetensors hold per-expert hub keys (no fused tensors) in bf16."""
    path = out_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    expected = {f"model.layers.{l}.mlp.experts.{e}.{p}_proj.weight" for l in range(cfg.num_hidden_layers)
                for e in range(cfg.num_experts) for p in ("gate", "up", "down")}
    missing = expected - set(keys)
    fused = [k for k in keys if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    if missing or fused:
        raise RuntimeError(f"checkpoint layout unexpected: {len(missing)} missing expert keys, fused={fused[:3]}")
    size = path.stat().st_size
    LOG.info("checkpoint %s: %d tensors, dtypes %s, %.1f MB, per-expert keys OK", path, len(keys), dtypes, size / 1e6)
    return {"file": path.name, "bytes": size, "tensors": len(keys), "dtypes": sorted(dtypes)}


def save_and_reload(model: Qwen2MoeForCausalLM, tok: PreTrainedTokenizerFast, out_dir: Path,
                    probe: torch.Tensor) -> Qwen2MoeForCausalLM:
    """Save the model in bf16 with the tokenizer, reload it and require bit-equal logits on ``probe``.

    Only parameters are cast: buffers (rotary ``inv_freq``) stay fp32, as ``from_pretrained`` builds them."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.config.use_cache = True  # trained with use_cache=False; the saved model should cache when generating
    model.generation_config.use_cache = True
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = (m(input_ids=probe, use_cache=False).logits for m in (model, reloaded))
    if not torch.equal(a, b):
        raise RuntimeError(f"reloaded logits differ: max abs diff {(a.float() - b.float()).abs().max().item()}")
    LOG.info("reloaded model reproduces the in-memory bf16 logits exactly on %d tokens", probe.numel())
    return reloaded


def prepare_tokenizer(args: argparse.Namespace, docs: list[str]) -> tuple[PreTrainedTokenizerFast, torch.Tensor]:
    """Train, wrap, save and reload-check the tokenizer; return it and the encoded training stream."""
    raw = train_tokenizer(docs, args.vocab_size)
    tok = wrap_tokenizer(raw, 2 * args.context)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(args.out_dir)
    loaded = AutoTokenizer.from_pretrained(args.out_dir)
    sample = docs[0][:2000]
    if loaded(sample)["input_ids"] != raw.encode(sample).ids or loaded.eos_token != EOT:
        raise RuntimeError("tokenizer reloaded with AutoTokenizer does not match the trained one")
    LOG.info("tokenizer: %d tokens, reloads as %s", len(loaded), type(loaded).__name__)
    data = encode_docs(lambda d: [e.ids for e in raw.encode_batch(d)], docs, raw.token_to_id(EOT))
    return tok, data


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (keeps training.json machine-neutral)."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    """Train, save, verify, evaluate, and record the default model."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    docs = split_docs(args.train_text.read_text(encoding="utf-8"))
    tok, data = prepare_tokenizer(args, docs)
    LOG.info("train split: %d documents, %d tokens (%.2f bytes/token)", len(docs), data.numel(),
             args.train_text.stat().st_size / data.numel())
    model = Qwen2MoeForCausalLM(build_config(args, len(tok), tok.eos_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2fM parameters, experts implementation %s", n_params / 1e6, model.config._experts_implementation)
    t1 = time.time()
    stats = train(model, data, args)
    train_s = time.time() - t1
    probe = data[:64].unsqueeze(0)
    reloaded = save_and_reload(model, tok, args.out_dir, probe)
    ckpt = check_checkpoint(args.out_dir, reloaded.config)
    held_tok = AutoTokenizer.from_pretrained(args.out_dir)
    held_docs = split_docs(args.heldout_text.read_text(encoding="utf-8"))
    held = encode_docs(lambda d: held_tok(d, add_special_tokens=False, verbose=False)["input_ids"], held_docs, held_tok.eos_token_id)
    metrics = evaluate(reloaded, held, args.context, unigram_logprobs(data, len(tok)))
    LOG.info("held-out: perplexity %.2f vs unigram %.2f on %d tokens; expert share min %.4f max %.4f",
             metrics["perplexity"], metrics["unigram_perplexity"], metrics["scored_tokens"],
             metrics["expert_utilisation"]["min"], metrics["expert_utilisation"]["max"])
    record = {"seed": args.seed, "args": {k: rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model_config": json.loads(reloaded.config.to_json_string()), "parameters": n_params,
              "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.context,
              "train_tokens": data.numel(), "train_documents": len(docs), "train_wall_s": round(train_s, 1),
              "total_wall_s": round(time.time() - t0, 1), **stats, "checkpoint": ckpt,
              "heldout_eval_of_saved_bf16_model": metrics,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "tokenizers": __import__("tokenizers").__version__}}
    (args.out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    LOG.info("wrote %s; total wall time %.1f min", args.out_dir / "training.json", record["total_wall_s"] / 60)


if __name__ == "__main__":
    main()
