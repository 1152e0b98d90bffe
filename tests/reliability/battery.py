"""Shared set-up of the fault-injection battery (tests/reliability/test_battery_*.py).

    env = Env.build(tmp_path, tiny_checkpoint)   # model dir (+ char tokenizer), artifact fitted on it, texts
    snap = snapshot(tmp_path)                    # {relative path: sha256 or "<dir>"} of everything under tmp_path
    run_cli(argv) -> (exit code, stdout, stderr) # the real dispatcher, in process

A refused command must leave `snapshot(tmp_path)` exactly as it was: no file changed, none added, none removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import globe
from tests.helpers.fits import char_tokenizer, quick_fit

QUICK = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "2", "--varpro-steps", "3"]
EVAL = ["--max-length", "16", "--no-speed", "--hit-tokens", "8", "--warmup-tokens", "16"]
CALIB = ["--max-tokens", "64", "--window", "16"]
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 6


@dataclass
class Env:
    tmp: Path
    model: Path          # tiny qwen2_moe checkpoint with a character tokenizer
    art: Path            # artifact fitted on `model`
    text: Path           # a UTF-8 text file

    @classmethod
    def build(cls, tmp: Path, tiny_checkpoint, arch: str = "qwen2_moe") -> "Env":
        model = tmp / "model"
        shutil.copytree(tiny_checkpoint(arch), model)
        char_tokenizer(model)
        fit = quick_fit(tiny_checkpoint(arch))
        result = dataclasses.replace(fit, source={**fit.source, "model_dir": str(model)})
        globe.save(result, tmp / "art")
        text = tmp / "text.txt"
        text.write_text(TEXT)
        return cls(tmp, model, tmp / "art", text)

    # ---- argv of every command on this env ----
    def fit(self, out: Path | None = None, *extra: str) -> list[str]:
        return ["fit", str(self.model), "-o", str(out or self.tmp / "out"), *QUICK, *extra]

    def export(self, out: Path | None = None, *extra: str) -> list[str]:
        return ["export", str(self.art), "--model", str(self.model), "-o", str(out or self.tmp / "hf"), *extra]

    def eval(self, *extra: str, model: Path | None = None) -> list[str]:
        return ["eval", str(model or self.model), "--globe", str(self.art), "--text", str(self.text), *EVAL,
                "--json", *extra]

    def bench(self, *extra: str) -> list[str]:
        return ["bench", str(self.model), "--globe", str(self.art), "--modes", "factored", "--text",
                str(self.text), *EVAL, *extra]

    def calibrate(self, out: Path | None = None, *extra: str, text: Path | None = None) -> list[str]:
        return ["calibrate", str(self.model), "--text", str(text or self.text), "-o",
                str(out or self.tmp / "stats.safetensors"), *CALIB, *extra]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and directory under root."""
    return {str(p.relative_to(root)): ("<dir>" if p.is_dir() else sha(p)) for p in sorted(root.rglob("*"))}


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    out = edit(doc)
    path.write_text(json.dumps(doc if out is None else out))


def edit_config(model: Path, **changes) -> None:
    """Set (value) or delete (None) keys of model/config.json."""
    def edit(doc):
        for key, value in changes.items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
    edit_json(model / "config.json", edit)


def edit_safetensors(path: Path, edit) -> None:
    """Rewrite a safetensors file through edit(tensors) (in place), keeping its header metadata."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)
