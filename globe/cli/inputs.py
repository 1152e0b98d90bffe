"""Inputs before work: every input file, directory and number of every command is checked before any model is
loaded, fitted or written, and each refusal is one line naming the option as the user typed it.

    check_inputs(subparser, args, argv)      # cli.main, between parsing and the command's run

One checker per kind of option, registered by name (`KINDS`); which option is of which kind is the table
`OPTIONS` (by argparse dest, for every command) with `PER_COMMAND` where a command means something else by it.
Outputs (-o, --metrics, --plots, --dense-out) are globe.core.outputs' business and are only named here
(`OUTPUTS`), so that tests/cli/test_inputs_first.py can tell that no path or number option was forgotten.
Only headers and small files are read: no tensor, no model.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globe.errors import ConfigError, ModelDirError

Check = Callable[[Any, str], None]          # (value, the flag as typed) -> None, or a GlobeError naming the flag
KINDS: dict[str, Check] = {}


def kind(name: str) -> Callable[[Check], Check]:
    """Register a checker under `name` (used by OPTIONS / PER_COMMAND)."""
    def register(check: Check) -> Check:
        KINDS[name] = check
        return check
    return register


def _named(flag: str, key: str) -> str:
    return f"{flag} ({key})" if key else flag


@dataclass(frozen=True)
class Count:
    """An integer option within [low, high]; `key`: the config entry it sets, named next to the flag."""

    low: int
    high: int | None = None
    key: str = ""
    what: str = "an integer"
    zero: str = ""                      # what 0 means where 0 is allowed below `low` (e.g. "all of the text")

    def __call__(self, value: int, flag: str) -> None:
        if self.zero and value == 0:
            return
        if value < self.low or (self.high is not None and value > self.high):
            bound = "> 0" if self.low == 1 else f">= {self.low}"
            top = f" and <= {self.high}" if self.high is not None else ""
            zero = f", or 0 for {self.zero}" if self.zero else ""
            raise ConfigError(f"{_named(flag, self.key)} must be {self.what} {bound}{top}{zero} (got {value})")


@dataclass(frozen=True)
class Fraction:
    """A float option strictly between low and high (finite); a list option: each value."""

    low: float = 0.0
    high: float = 1.0
    key: str = ""

    def __call__(self, value: float | list[float], flag: str) -> None:
        for v in value if isinstance(value, list) else [value]:
            if not (math.isfinite(v) and self.low < v < self.high):
                raise ConfigError(f"{_named(flag, self.key)} must be in ({self.low:g}, {self.high:g}), both ends "
                                  f"excluded (got {v:g})")


@dataclass(frozen=True)
class Positive:
    """A finite float option > 0."""

    def __call__(self, value: float, flag: str) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a number > 0 (got {value:g})")


@dataclass(frozen=True)
class AtLeast:
    """A finite float option >= low."""

    low: float = 0.0

    def __call__(self, value: float, flag: str) -> None:
        if not (math.isfinite(value) and value >= self.low):
            raise ConfigError(f"{flag} must be a number >= {self.low:g} (got {value:g})")


# ---- paths ----
def _missing(path: Path, flag: str, what: str) -> None:
    if not path.exists():
        raise ModelDirError(f"{flag} {path} does not exist; pass an existing {what}")


@kind("text")
def text_file(value: str, flag: str) -> None:
    """An existing, non-empty UTF-8 text file."""
    from globe.io.text import read_text
    path = Path(value)
    if path.is_dir():
        raise ModelDirError(f"{flag} {path} is a directory; pass a UTF-8 text file")
    read_text(path, flag)                                 # missing, not UTF-8, empty: one line naming flag and file


def _model_dir(value: str, flag: str, compressed_ok: bool) -> None:
    from globe.formats.checkpoint import is_compressed
    from globe.io.hub import looks_like_hub_id
    from globe.io.shards import missing_config_message
    path = Path(value)
    if not path.exists():
        if looks_like_hub_id(value):                      # a hub id: resolved (downloaded) next, or one line why not
            return
        usage = f"{flag} MODEL_DIR, " if flag.startswith("-") else ""
        raise ModelDirError(f"{flag} {path} does not exist; pass {usage}a Hugging Face checkpoint directory "
                            "(config.json + *.safetensors)")
    if not path.is_dir():
        raise ModelDirError(f"{flag} {path} is a file; pass a Hugging Face checkpoint directory "
                            "(config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{flag}: {missing_config_message(path)}")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: config.json is not valid JSON ({type(exc).__name__}); fix or "
                          "re-download it") from None
    if not compressed_ok and is_compressed(path):
        raise ModelDirError(f"{flag} {path} is a GloBE compressed checkpoint, not a source model; pass the model "
                            "it was made from (`globe info` on it names the source)")


@kind("source model")
def source_model(value: str, flag: str) -> None:
    """A Hugging Face checkpoint directory that is not a GloBE compressed one (or a hub id)."""
    _model_dir(value, flag, compressed_ok=False)


@kind("model")
def any_model(value: str, flag: str) -> None:
    """A Hugging Face checkpoint directory, compressed or not (or a hub id)."""
    _model_dir(value, flag, compressed_ok=True)


@kind("artifact")
def artifact(value: str, flag: str) -> None:
    """A `globe fit` artifact (banks.safetensors + globe_config.json) or a compressed checkpoint."""
    from globe.formats.artifact import BANKS_FILE, CONFIG_FILE
    from globe.formats.checkpoint import is_compressed
    path = Path(value)
    _missing(path, flag, "GloBE artifact (globe fit -o OUT) or compressed checkpoint (globe compress -o OUT)")
    if (path / BANKS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return
    if path.is_dir() and (path / "config.json").is_file() and is_compressed(path):
        return
    what = "a file" if path.is_file() else ("an uncompressed model" if (path / "config.json").is_file()
                                            else "not a GloBE directory")
    raise ModelDirError(f"{flag} {path} is {what}; pass a GloBE artifact (`globe fit -o OUT`: banks.safetensors "
                        "+ globe_config.json) or a compressed checkpoint (`globe compress -o OUT`)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


@kind("tokenizer")
def tokenizer_dir(value: str, flag: str) -> None:
    """A directory holding tokenizer files."""
    path = Path(value)
    _missing(path, flag, "tokenizer directory")
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{flag} {path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); pass the "
                            "directory of a saved tokenizer, e.g. the source model's")


@kind("stats")
def stats_file(value: str, flag: str) -> None:
    """A `globe calibrate` statistics file (its safetensors header only)."""
    from safetensors import SafetensorError, safe_open
    from globe.formats.stats import STATS_KIND
    path = Path(value)
    if not path.exists():
        raise ModelDirError(f"{flag} {path} does not exist: run `globe calibrate MODEL_DIR --text FILE -o {path}` "
                            "first")
    try:
        if path.is_dir():
            raise OSError("a directory")
        with safe_open(str(path), "pt") as fh:
            kind_ = (fh.metadata() or {}).get("kind")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: not a safetensors statistics file ({' '.join(str(exc).split())[:80]}); "
                          f"write one with `globe calibrate MODEL_DIR --text FILE -o STATS`") from None
    if kind_ != STATS_KIND:
        raise ConfigError(f"{flag} {path}: not a GloBE activation statistics file; write one with "
                          f"`globe calibrate MODEL_DIR --text FILE -o STATS`")


@kind("fit config")
def fit_config(value: str, flag: str) -> None:
    """A fit config file (JSON or YAML) that FitConfig reads."""
    from globe.fit.config import FitConfig
    path = Path(value)
    _missing(path, flag, "fit config file (JSON or YAML)")
    if path.is_dir():
        raise ModelDirError(f"{flag} {path} is a directory; pass a fit config file (JSON or YAML)")
    text_file(value, flag)                                # UTF-8, not empty
    try:
        FitConfig.from_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {exc}") from None


@kind("json")
def json_file(value: str, flag: str) -> None:
    """An existing JSON file holding an object."""
    path = Path(value)
    text_file(value, flag)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{flag} {path}: must hold a JSON object, not {type(doc).__name__}")


@kind("directory")
def directory(value: str, flag: str) -> None:
    path = Path(value)
    _missing(path, flag, "directory")
    if not path.is_dir():
        raise ModelDirError(f"{flag} {path} is a file; pass a directory")


# ---- which option is of which kind (argparse dest -> kind name or number checker) ----
SEED = Count(0, 2 ** 63 - 1, key="train.seed")
OPTIONS: dict[str, str | Check] = {
    # paths
    "model_dir": "source model", "model": "source model", "original": "source model",
    "text": "text", "calibration_text": "text", "calib": "text",
    "tokenizer": "tokenizer", "calibration": "stats", "config": "fit config", "sweep": "json",
    "task_dir": "directory", "globe": "artifact", "artifact": "artifact",
    # numbers
    "budget": Fraction(key="bank.budget"), "total_cut": Fraction(), "budgets": Fraction(), "size": Positive(),
    "m": Count(1, key="bank.m"), "r": Count(1, key="bank.r"), "target_support": Count(1, key="sparsity.target_support"),
    "am_iters": Count(0, key="train.am_iters"), "varpro_steps": Count(0, key="train.varpro_steps"),
    "cycles": Count(1, key="train.cycles"), "refine_steps": Count(0, key="train.refine_steps"), "seed": SEED,
    "bits": Count(1, key="quant.bits"), "quant_group": Count(1, key="quant.group"),
    "residual_bits": Count(1, key="quant.residual_bits"), "residual_group": Count(1, key="quant.residual_group"),
    "activation_steps": Count(0, key="activation.steps"), "checkpoint_every": Count(0, key="train.checkpoint_every"),
    "calibration_tokens": Count(2, what="a token count"), "calibration_mix": AtLeast(0.0),
    "distill_steps": Count(0), "distill_lr": Positive(),
    "expert_steps": Count(0, key="expert.steps"), "quant_steps": Count(0, key="expert.quant_steps"),
    "eval_tokens": Count(2, what="a token count", zero="all of the text"), "max_tokens": Count(0),
    "window": Count(2), "cache_size": Count(1),
    "cache_bytes": Count(0), "warmup_tokens": Count(0), "max_length": Count(2), "stride": Count(1),
    "prefill_tokens": Count(1), "decode_tokens": Count(1), "repeats": Count(1), "hit_tokens": Count(0),
    "limit": Count(1), "num_fewshot": Count(0), "batch_size": Count(1), "bootstrap_iters": Count(0),
}
PER_COMMAND: dict[tuple[str, str], str | Check] = {
    ("info", "model_dir"): "model", ("eval", "model_dir"): "model", ("bench", "model_dir"): "model",
    ("calibrate", "max_tokens"): Count(2),
}
OUTPUTS = frozenset({"out", "metrics", "plots", "dense_out"})      # checked by globe.core.outputs


def checker(command: str, dest: str) -> Check | None:
    """The check of option `dest` of `command`, or None when it has none here."""
    spec = PER_COMMAND.get((command, dest), OPTIONS.get(dest))
    return KINDS[spec] if isinstance(spec, str) else spec


def typed_flag(action: argparse.Action, argv: list[str], options: frozenset[str] = frozenset()) -> str:
    """The option as the user typed it (an alias or an abbreviation), else its long name; a positional's METAVAR.
    options: every option string of the command (a word that is one is never an abbreviation of another)."""
    if not action.option_strings:
        return str(action.metavar or action.dest.upper())
    names = [tok.split("=", 1)[0] for tok in argv if tok.startswith("-")]
    for name in reversed(names):
        if name in action.option_strings:
            return name
    for name in reversed(names):                          # argparse's unambiguous abbreviations
        if name.startswith("--") and name not in options and any(s.startswith(name) for s in action.option_strings):
            return name
    return max(action.option_strings, key=len)


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Check every input option of the parsed command (defaults included) before any work; GlobeError naming the
    option as typed. Numbers first (cheap), then paths, each group in the parser's order."""
    command = getattr(args, "command", "")
    options = frozenset(s for a in parser._actions for s in a.option_strings)
    actions = [a for a in parser._actions if a.dest not in OUTPUTS and a.dest in vars(args)]
    checks = [(a, checker(command, a.dest)) for a in actions]
    checks = [(a, c) for a, c in checks if c is not None and getattr(args, a.dest) is not None]
    numbers = (Count, Fraction, Positive, AtLeast)
    for action, check in sorted(checks, key=lambda ac: not isinstance(ac[1], numbers)):
        check(getattr(args, action.dest), typed_flag(action, argv, options))
