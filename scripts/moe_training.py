"""Shared training code for the small Qwen2-MoE and Mixtral language models GloBE is built and evaluated on.

Used by ``scripts/train_default_model.py`` (the embedded model), ``scripts/train_scratch_moe.py``,
``scripts/train_upcycled_moe.py`` and ``scripts/train_mixtral_moe.py`` (the evaluation models under
``benchmarks/models/``). It holds the pieces every
one of them needs, each a small function: command-line options, corpus splitting, byte-level BPE tokenizer,
AdamW with warmup + cosine decay, the training loop (next-token loss plus a per-layer router balancing loss),
bf16 save with a bit-exact reload check, the per-expert checkpoint layout check, held-out perplexity against an
add-one unigram baseline, expert utilisation, and the expert-sharing statistics of a saved checkpoint.

Not a script: import it from a script in ``scripts/`` (which puts this folder on ``sys.path``).
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
from transformers import (AutoModelForCausalLM, AutoTokenizer, MixtralConfig, PreTrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2MoeConfig)
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

LOG = logging.getLogger("moe_training")
REPO_ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


def add_model_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Add the model-shape options; ``defaults`` gives each script's values (keys are the option dests)."""
    a = p.add_argument
    a("--vocab-size", type=int, default=defaults["vocab_size"], help="BPE vocabulary size, special tokens included")
    a("--hidden-size", type=int, default=defaults["hidden_size"], help="model width")
    a("--layers", type=int, default=defaults["layers"], help="decoder layers (all MoE)")
    a("--heads", type=int, default=defaults["heads"], help="attention heads")
    a("--kv-heads", type=int, default=defaults["kv_heads"], help="key/value heads (GQA)")
    a("--experts", type=int, default=defaults["experts"], help="routed experts per layer")
    a("--top-k", type=int, default=defaults["top_k"], help="routed experts per token")
    a("--moe-intermediate", type=int, default=defaults["moe_intermediate"], help="routed expert intermediate size")
    a("--shared-intermediate", type=int, default=defaults.get("shared_intermediate", 0),
      help="shared expert intermediate size (0: no shared expert, for architectures without one)")


def add_training_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Add the data / optimisation options; ``defaults`` gives each script's values (keys are the option dests)."""
    a = p.add_argument
    a("--train-text", type=Path, default=defaults["train_text"], help="training split")
    a("--heldout-text", type=Path, default=defaults["heldout_text"], help="held-out split for evaluation")
    a("--out-dir", type=Path, default=defaults["out_dir"], help="where the model, tokenizer and training.json go")
    a("--seed", type=int, default=defaults.get("seed", 1234), help="seed for torch and the data-sampling generator")
    a("--threads", type=int, default=1, help="torch / tokenizers CPU threads")
    a("--aux-loss-coef", type=float, default=defaults.get("aux_loss_coef", 0.01),
      help="router load-balancing loss coefficient (per layer)")
    a("--context", type=int, default=256, help="training / evaluation window in tokens")
    a("--batch-size", type=int, default=8, help="sequences per step")
    a("--steps", type=int, default=defaults["steps"], help="optimizer steps")
    a("--lr", type=float, default=defaults.get("lr", 3e-3), help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    a("--warmup", type=int, default=defaults.get("warmup", 100), help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--log-every", type=int, default=50, help="log the running loss every N steps")


def setup(args: argparse.Namespace) -> float:
    """Logging, thread count and the global seed; returns the start time."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return time.time()


def moe_config(args: argparse.Namespace, vocab: int, eos_id: int, **overrides: Any) -> Qwen2MoeConfig:
    """The Qwen2-MoE configuration for the shape options in ``args`` (``overrides`` win)."""
    fields = dict(
        vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=args.shared_intermediate, intermediate_size=args.shared_intermediate,
        max_position_embeddings=2 * args.context, tie_word_embeddings=True, output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef, decoder_sparse_step=1, norm_topk_prob=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    fields.update(overrides)
    return Qwen2MoeConfig(**fields)


def mixtral_config(args: argparse.Namespace, vocab: int, eos_id: int, **overrides: Any) -> MixtralConfig:
    """The Mixtral configuration (every layer MoE, no shared expert, top-k weights renormalised) for the shape
    options in ``args``; ``--moe-intermediate`` is the expert width (Mixtral's ``intermediate_size``)."""
    fields = dict(
        vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, intermediate_size=args.moe_intermediate,
        max_position_embeddings=2 * args.context, tie_word_embeddings=True, output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef, router_jitter_noise=0.0, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    fields.update(overrides)
    return MixtralConfig(**fields)


def num_experts(cfg: PreTrainedConfig) -> int:
    """Routed experts per MoE layer (Qwen2-MoE says ``num_experts``, Mixtral ``num_local_experts``)."""
    value = getattr(cfg, "num_experts", None)
    return int(value if value is not None else getattr(cfg, "num_local_experts", 0) or 0)


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


def encode_text_file(path: Path, tok_dir: Path) -> torch.Tensor:
    """Encode a corpus file with the tokenizer saved in ``tok_dir`` (documents joined by EOS)."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    docs = split_docs(path.read_text(encoding="utf-8"))
    return encode_docs(lambda d: tok(d, add_special_tokens=False, verbose=False)["input_ids"], docs, tok.eos_token_id)


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


def has_experts(model: PreTrainedModel) -> bool:
    """Whether any decoder layer of ``model`` is a MoE layer (a dense run has ``mlp_only_layers`` = all)."""
    cfg = model.config
    return num_experts(cfg) > 0 and len(getattr(cfg, "mlp_only_layers", None) or []) < cfg.num_hidden_layers


def losses(model: PreTrainedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Next-token cross-entropy and the router load-balancing loss, averaged over layers.

    ``transformers`` pools all layers' router statistics per expert index before balancing, which lets single
    layers stay unbalanced; balancing each layer separately (then averaging) keeps every layer's experts in use.
    The value is ``top_k`` for perfectly balanced routing; 0 (and no router logits) for a dense model."""
    moe = has_experts(model)
    out = model(input_ids=x, output_router_logits=moe, use_cache=False)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    if not moe:
        return lm, torch.zeros(()), ()
    cfg = model.config
    aux = torch.stack([load_balancing_loss_func((r,), num_experts(cfg), cfg.num_experts_per_tok)
                       for r in out.router_logits]).mean()
    return lm, aux, out.router_logits


def routing_shares(router_logits: tuple, top_k: int) -> torch.Tensor:
    """[layers, experts] share of the top-k routing slots taken by each expert."""
    counts = torch.stack([torch.bincount(r.detach().float().topk(top_k, dim=-1).indices.flatten(),
                                         minlength=r.shape[-1]) for r in router_logits]).double()
    return counts / counts.sum(dim=1, keepdim=True)


def _log_step(step: int, args: argparse.Namespace, lm_hist: list[float], aux: float, lr: float,
              router_logits: tuple, top_k: int) -> None:
    recent = lm_hist[-args.log_every:]
    share = f" expert share min {routing_shares(router_logits, top_k).min().item():.3f} max " \
            f"{routing_shares(router_logits, top_k).max().item():.3f}" if router_logits else ""
    LOG.info("step %d/%d lm_loss(avg %d) %.4f aux %.4f lr %.2e%s", step + 1, args.steps, args.log_every,
             sum(recent) / len(recent), aux, lr, share)


def train(model: PreTrainedModel, data: torch.Tensor, args: argparse.Namespace, desc: str = "train") -> dict[str, Any]:
    """Run the training loop (``args.steps`` AdamW steps on random windows); return loss statistics and the
    loop's CPU time (``train_cpu_s``: on a shared machine it says more about the cost than the wall time)."""
    gen = torch.Generator().manual_seed(args.seed)
    cpu0 = time.process_time()
    opt, sched = make_optimizer(model, args)
    model.train()
    lm_hist: list[float] = []
    aux_hist: list[float] = []
    bar = tqdm(range(args.steps), desc=desc, mininterval=30)
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
            _log_step(step, args, lm_hist, aux_hist[-1], sched.get_last_lr()[0], router_logits,
                      model.config.num_experts_per_tok)
    tail = lm_hist[-50:]
    return {"final_train_lm_loss_last_step": lm_hist[-1], "final_train_lm_loss_mean_last_50": sum(tail) / len(tail),
            "final_router_aux_loss": aux_hist[-1], "loss_every_50_steps": lm_hist[::50],
            "train_cpu_s": round(time.process_time() - cpu0, 1)}
