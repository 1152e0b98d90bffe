"""Shared set-up of the round-three battery (tests/reliability/test_round3_*.py): a tiny source model with a
character tokenizer, its compressed checkpoint, and the CLI run in process.

    env = Round3.build(tmp_path, base)        # copies of the module's model / compressed checkpoint / text
    code, err = env.cli(capsys, "info", str(env.comp))
    assert_refused(code, err, "model.safetensors")   # exit 2, one line naming it, no traceback
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from globe.cli.main import main
from tests.reliability.battery import EVAL, TEXT, snapshot

WEIGHTS = "model.safetensors"


@dataclass
class Round3:
    tmp: Path
    model: Path          # the source
    comp: Path           # its compressed checkpoint (made with `globe compress`)
    text: Path

    @classmethod
    def build(cls, tmp: Path, base: Path) -> "Round3":
        for name in ("model", "comp"):
            shutil.copytree(base / name, tmp / name)
        (tmp / "text.txt").write_text(TEXT)
        doc = json.loads((tmp / "comp" / "globe_config.json").read_text())
        doc["source"]["model_dir"] = str(tmp / "model")          # the copy is this checkpoint's source
        (tmp / "comp" / "globe_config.json").write_text(json.dumps(doc))
        return cls(tmp, tmp / "model", tmp / "comp", tmp / "text.txt")

    def cli(self, capsys, *argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["--log-level", "ERROR", *argv])
        return code, capsys.readouterr().err

    # the commands that read a compressed checkpoint
    def commands(self) -> dict[str, list[str]]:
        return {"info": ["info", str(self.comp)],
                "eval": ["eval", str(self.comp), "--text", str(self.text), *EVAL, "--json"],
                "bench": ["bench", str(self.comp), "--modes", "factored", "--text", str(self.text), *EVAL,
                          "--no-original"]}


def assert_refused(code: int, err: str, *names: str) -> None:
    """Exit 2, no traceback, exactly one `globe CMD: error:` line, which names each of `names`."""
    # transformers' loading bars (quieted at --log-level WARNING by issue 24) are not error lines
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    lines = [line.split("it/s]")[-1] for line in lines]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and ": error: " in lines[0], err
    for name in names:
        assert name in lines[0], (name, lines[0])


def edit_quant(comp: Path, family: str | None, key: str, value) -> None:
    path = comp / "config.json"
    doc = json.loads(path.read_text())
    target = doc["quantization_config"] if family is None else doc["quantization_config"]["families"][family]
    target[key] = value
    path.write_text(json.dumps(doc))


def edit_tensors(comp: Path, edit) -> None:
    """Rewrite model.safetensors through edit(tensors), keeping its metadata."""
    with safe_open(str(comp / WEIGHTS), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(comp / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(comp / WEIGHTS), metadata=meta)


def key_of(comp: Path, part: str) -> str:
    with safe_open(str(comp / WEIGHTS), "pt") as fh:
        return next(k for k in sorted(fh.keys()) if part in k)


def zero_like(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


__all__ = ["Round3", "assert_refused", "edit_quant", "edit_tensors", "key_of", "snapshot", "WEIGHTS"]
