"""Export a GloBE artifact two ways and load each back the way it will be deployed.

    python examples/export_and_deploy.py --artifact runs/qwen_moe --out runs/deploy
    python examples/export_and_deploy.py --artifact runs/q --model CKPT --out runs/deploy --prompt "def main("

1. compressed checkpoint (quant_method "globe", banks stored once): globe.save_compressed -> globe.load_compressed
   or transformers.AutoModelForCausalLM.from_pretrained after `import globe` (GloBE runtime, smallest on disk);
2. dense Hugging Face checkpoint: globe.export_dense -> transformers.AutoModelForCausalLM.from_pretrained (stock
   transformers, vLLM, lm-eval; no GloBE needed at serving time).
Both are checked to give the same next-token logits as the model patched in memory, then generate from a prompt.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import transformers

import globe
from globe.assets import DEFAULT_MODEL_DIR
from globe.export import load_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="artifact directory from `globe fit` / train_qwen_moe.py")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="the checkpoint the artifact was fitted on")
    p.add_argument("--out", default="runs/deploy", help="directory receiving compressed/ and dense/")
    p.add_argument("--prompt", default="The dictionary method", help="prompt for the generation check")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated from the prompt")
    return p.parse_args()


def generate(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, torch.Tensor]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
    return tokenizer.decode(out[0, ids.shape[1]:]), logits


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    reference = globe.apply_globe(load_model(args.model), args.artifact, mode="dense")
    _, ref_logits = generate(reference, tokenizer, args.prompt, 1)

    globe.save_compressed(args.model, args.artifact, out / "compressed")
    compressed = globe.load_compressed(out / "compressed", mode="cached")
    text, logits = generate(compressed, tokenizer, args.prompt, args.new_tokens)
    gap = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    size = sum(f.stat().st_size for f in (out / "compressed").iterdir()) / 2**20
    print(f"compressed ({size:.1f} MiB): max logit gap {gap:.2e}; {args.prompt!r} -> {text!r}")

    globe.export_dense(args.model, args.artifact, out / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(out / "dense", dtype="auto").eval()
    text, logits = generate(dense, tokenizer, args.prompt, args.new_tokens)
    gap = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    print(f"dense HF checkpoint (stock transformers): max logit gap {gap:.2e}; {args.prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
