"""Synthetic upcycled MoE checkpoint with the exact Qwen1.5-MoE-A2.7B routed-expert shapes, for scale tests.

Qwen1.5-MoE-A2.7B was upcycled from a dense model: each layer's dense FFN (intermediate 4 x 1408 = 5632) was split
into `parents` fine-grained FFNs of 1408 rows, copied into the 60 experts and perturbed. This script mimics that:

    row space   V [q, d]            one random low-rank row space with a decaying spectrum, shared by every layer
    layer l     F_l [P*p, d]        dense FFN = C_l diag(s) V + isotropic bulk (gate and up drawn independently)
    expert e    W = F_l[rows of parent e % P] + noise * N(0, std^2)

and writes config.json (model_type qwen2_moe) plus one safetensors shard per layer (hub per-expert keys and the
router), listed in model.safetensors.index.json. It holds only the routed experts and routers: globe.io reads it,
transformers cannot load it. One layer is generated and written at a time (about 1.5 GB of RAM at full size).
Down projections are the parent's, without noise (GloBE does not fit them; they only have to exist).

    python benchmarks/make_upcycled.py --out /tmp/qwen15_upcycled            # 24 x 60 experts, bf16, ~25 GB
    python benchmarks/make_upcycled.py --out /tmp/tiny --layers 2 --experts 4 --hidden 32 --intermediate 16
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

log = logging.getLogger("benchmarks.make_upcycled")

KEY = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
ROUTER = "model.layers.{layer}.mlp.gate.weight"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output checkpoint directory (created)")
    p.add_argument("--layers", type=int, default=24, help="MoE layers (Qwen1.5-MoE-A2.7B: 24)")
    p.add_argument("--experts", type=int, default=60, help="routed experts per layer (60)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token, written to config.json (4)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size d (2048)")
    p.add_argument("--intermediate", type=int, default=1408, help="routed expert intermediate size p (1408)")
    p.add_argument("--parents", type=int, default=4, help="dense-FFN slices each layer's experts are copied from (4)")
    p.add_argument("--rank", type=int, default=256, help="dimension q of the row space shared by all layers")
    p.add_argument("--structured", type=float, default=0.8, help="fraction of a parent's energy in the shared space")
    p.add_argument("--noise", type=float, default=0.3, help="per-expert noise std relative to the weights' std")
    p.add_argument("--std", type=float, default=0.02, help="entry std of the dense FFNs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="stored dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    return p.parse_args(argv)


def qwen2_moe_config(args: argparse.Namespace) -> dict:
    """config.json of a Qwen2-MoE with the requested expert dims (other fields as Qwen1.5-MoE-A2.7B)."""
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": args.hidden,
            "intermediate_size": args.parents * args.intermediate, "moe_intermediate_size": args.intermediate,
            "shared_expert_intermediate_size": args.parents * args.intermediate, "num_experts": args.experts,
            "num_experts_per_tok": args.top_k, "num_hidden_layers": args.layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": 1024, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "norm_topk_prob": False,
            "tie_word_embeddings": False, "torch_dtype": args.dtype}


def shared_row_space(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """S V: [q, d] with orthonormal rows V scaled by a decaying spectrum s_k ~ 1/sqrt(k+1) (unit mean square)."""
    q = min(args.rank, args.hidden)
    basis = torch.linalg.qr(torch.randn(args.hidden, q, generator=gen)).Q.T          # [q, d]
    spectrum = (torch.arange(q) + 1.0).rsqrt()
    return spectrum[:, None] / spectrum.square().mean().sqrt() * basis


def dense_ffn(rows: int, space: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """[rows, d] with entry std `args.std`: `structured` of the energy in the shared row space, the rest isotropic."""
    q, d = space.shape
    coef = torch.randn(rows, q, generator=gen) * (d / q) ** 0.5                       # rows of C_l diag(s) V
    low = coef @ space                                                                 # E|row|^2 = d
    bulk = torch.randn(rows, d, generator=gen)
    a = args.structured ** 0.5
    return args.std * (a * low + (1 - args.structured) ** 0.5 * bulk)


def layer_tensors(layer: int, space: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> dict:
    """Every tensor of one MoE layer (routed experts and router), in the stored dtype."""
    p, dtype = args.intermediate, getattr(torch, args.dtype)
    parents = {proj: dense_ffn(args.parents * p, space, args, gen).view(args.parents, p, -1)
               for proj in ("gate_proj", "up_proj")}                                  # [P, p, d]
    down = torch.randn(args.parents, args.hidden, p, generator=gen) * args.std        # [P, d, p]
    out = {ROUTER.format(layer=layer): (torch.randn(args.experts, args.hidden, generator=gen) * args.std).to(dtype)}
    for e in range(args.experts):
        parent = e % args.parents
        for proj, w in parents.items():
            noise = torch.randn(w.shape[1:], generator=gen) * (args.noise * args.std)
            out[KEY.format(layer=layer, expert=e, proj=proj)] = (w[parent] + noise).to(dtype)
        out[KEY.format(layer=layer, expert=e, proj="down_proj")] = down[parent].to(dtype)
    return out


def write_checkpoint(args: argparse.Namespace) -> Path:
    """Write config.json, one shard per layer and the index; returns the output directory."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    space = shared_row_space(args, gen)
    weight_map, total = {}, 0
    for layer in tqdm(range(args.layers), desc="layers"):
        shard = f"model-{layer + 1:05d}-of-{args.layers:05d}.safetensors"
        tensors = layer_tensors(layer, space, args, gen)
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(qwen2_moe_config(args), indent=1))
    log.info("wrote %s: %d layers x %d experts, %.2f GB", out, args.layers, args.experts, total / 1e9)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_checkpoint(parse_args(argv))


if __name__ == "__main__":
    main()
