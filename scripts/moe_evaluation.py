"""Save, verify and evaluate a trained small MoE (Qwen2-MoE or Mixtral), and write its ``training.json``.

The second half of the shared training code (``moe_training.py`` holds the first): bf16 save with a bit-exact
reload check, the per-expert hub-key layout check, held-out perplexity against an add-one unigram baseline over
non-overlapping windows, per-layer expert utilisation, and the expert-sharing statistics of the saved checkpoint
(mean |cos| between a layer's flattened gate matrices, and the share of their energy explained by the layer's
mean expert). Hub key names come from GloBE's architecture registry (``globe.io.arch``), so every architecture it
supports works here. ``finish`` runs all of it for a script. Not a script: import it from one in ``scripts/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from globe.io.arch import get_arch
from moe_training import REPO_ROOT, encode_text_file, num_experts

LOG = logging.getLogger("moe_evaluation")


def unigram_logprobs(train_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probabilities of an add-one smoothed unigram model estimated on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double()
    return torch.log((counts + 1) / (counts.sum() + vocab))


@torch.no_grad()
def evaluate(model: PreTrainedModel, ids: torch.Tensor, ctx: int, uni_logp: torch.Tensor) -> dict[str, Any]:
    """Perplexity over non-overlapping ``ctx`` windows (first token of each window is context only),
    the unigram baseline on the same targets, and per-layer expert utilisation over all held-out tokens."""
    model.eval()
    cfg = model.config
    nll, uni_nll, n = 0.0, 0.0, 0
    counts = torch.zeros(cfg.num_hidden_layers, num_experts(cfg), dtype=torch.long)
    for s in range(0, ids.numel() - 1, ctx):
        x = ids[s:s + ctx].unsqueeze(0)
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        nll += F.cross_entropy(out.logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
        uni_nll += -uni_logp[x[0, 1:]].sum().item()
        n += x.shape[1] - 1
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=num_experts(cfg))
    frac = counts.double() / counts.sum(dim=1, keepdim=True)
    return {"window": ctx, "windows": "non-overlapping", "scored_tokens": n, "heldout_tokens": ids.numel(),
            "loss": nll / n, "perplexity": math.exp(nll / n), "unigram_perplexity": math.exp(uni_nll / n),
            "expert_utilisation": {"definition": "share of top-k routing slots per expert (uniform = 1/E)",
                                   "per_layer": [[round(v, 4) for v in row] for row in frac.tolist()],
                                   "min": frac.min().item(), "max": frac.max().item(),
                                   "unused_experts": int((counts == 0).sum())}}


def check_checkpoint(out_dir: Path, cfg: PreTrainedConfig) -> dict[str, Any]:
    """Check the saved safetensors hold per-expert hub keys (no fused tensors) in bf16."""
    path = out_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    arch = get_arch(cfg.to_dict())
    expected = {arch.expert_key(p, l, e) for l in range(cfg.num_hidden_layers)
                for e in range(num_experts(cfg)) for p in ("gate", "up", "down")}
    missing = expected - set(keys)
    fused = [k for k in keys if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    if missing or fused:
        raise RuntimeError(f"checkpoint layout unexpected: {len(missing)} missing expert keys, fused={fused[:3]}")
    size = path.stat().st_size
    LOG.info("checkpoint %s: %d tensors, dtypes %s, %.1f MB, per-expert keys OK", path, len(keys), dtypes, size / 1e6)
    return {"file": path.name, "bytes": size, "tensors": len(keys), "dtypes": sorted(dtypes)}


def save_and_reload(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out_dir: Path,
                    probe: torch.Tensor) -> PreTrainedModel:
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


def layer_sharing(weights: torch.Tensor) -> dict[str, float]:
    """Sharing statistics of one layer's experts, ``weights`` [E, p, d] (any float dtype).

    mean_abs_cos: mean over expert pairs of |cos| between flattened matrices; mean_nearest_abs_cos: mean over experts
    of the largest |cos| to another expert; mean_expert_energy: E * ||mean_i W_i||^2 / sum_i ||W_i||^2, the share
    of the experts' energy explained by their mean (1/E for independent random experts, 1 for identical ones)."""
    flat = weights.flatten(1).double()                                   # [E, p*d]
    unit = flat / flat.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).abs()                                          # [E, E]
    e = flat.shape[0]
    off = cos[~torch.eye(e, dtype=torch.bool)].view(e, e - 1)
    energy = e * flat.mean(0).square().sum() / flat.square().sum()
    return {"mean_abs_cos": off.mean().item(), "mean_nearest_abs_cos": off.max(1).values.mean().item(),
            "mean_expert_energy": energy.item()}


def expert_sharing(ckpt_dir: Path, proj: str = "gate") -> dict[str, Any]:
    """``layer_sharing`` of every layer's ``proj`` matrices, read from the saved per-expert checkpoint."""
    cfg = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    arch = get_arch(cfg)
    n_experts = int(cfg.get("num_experts") or cfg["num_local_experts"])
    per_layer = []
    with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
        for layer in range(cfg["num_hidden_layers"]):
            w = torch.stack([f.get_tensor(arch.expert_key(proj, layer, e))
                             for e in range(n_experts)])                 # [E, p, d]
            per_layer.append({k: round(v, 4) for k, v in layer_sharing(w).items()})
    mean = {k: round(sum(row[k] for row in per_layer) / len(per_layer), 4) for k in per_layer[0]}
    return {"matrices": f"{proj}_proj, flattened", "independent_random_mean_expert_energy": 1 / n_experts,
            "mean_over_layers": mean, "per_layer": per_layer}


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (keeps training.json machine-neutral)."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def versions() -> dict[str, str]:
    """Library versions that determinism depends on."""
    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__}


def finish(model: PreTrainedModel, tok: PreTrainedTokenizerFast, data: torch.Tensor, args: argparse.Namespace,
           record: dict[str, Any], t0: float, sharing: bool = False) -> dict[str, Any]:
    """Save + reload-check + layout-check + evaluate the model, then write ``training.json`` with ``record``
    (already holding the training statistics) plus everything measured here; returns the full record.
    ``t0`` is the script's start time (for ``total_wall_s``)."""
    probe = data[:64].unsqueeze(0)
    reloaded = save_and_reload(model, tok, args.out_dir, probe)
    ckpt = check_checkpoint(args.out_dir, reloaded.config)
    held = encode_text_file(args.heldout_text, args.out_dir)
    metrics = evaluate(reloaded, held, args.context, unigram_logprobs(data, len(tok)))
    LOG.info("held-out: perplexity %.2f vs unigram %.2f on %d tokens; expert share min %.4f max %.4f",
             metrics["perplexity"], metrics["unigram_perplexity"], metrics["scored_tokens"],
             metrics["expert_utilisation"]["min"], metrics["expert_utilisation"]["max"])
    out = {"seed": args.seed, "args": {k: rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "model_config": json.loads(reloaded.config.to_json_string()), **record, "checkpoint": ckpt,
           "heldout_eval_of_saved_bf16_model": metrics}
    if sharing:
        out["expert_sharing"] = {proj: expert_sharing(args.out_dir, proj) for proj in ("gate", "up")}
        for proj, stats in out["expert_sharing"].items():
            LOG.info("expert sharing (%s, mean over layers): %s", proj, stats["mean_over_layers"])
    out["versions"] = versions()
    out["total_wall_s"] = round(time.time() - t0, 1)
    (args.out_dir / "training.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    LOG.info("wrote %s; total wall time %.1f min", args.out_dir / "training.json", out["total_wall_s"] / 60)
    return out
