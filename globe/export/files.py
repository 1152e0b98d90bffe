"""File helpers shared by the exporters: loading a source model, atomic safetensors writes, side files.

Every file lands through globe.core.files.atomic_write (temp file in the target directory, fsync, rename).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from globe.core import outputs
from globe.core.files import atomic_write, sort_metadata
from globe.errors import ModelDirError

log = logging.getLogger(__name__)

# Tokenizer and generation files copied next to an exported model when the source directory has them.
SIDE_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                               "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                               "chat_template.json", "generation_config.json")


def load_model(model_dir: str | Path, dtype: torch.dtype | str = "auto", device: str | None = None) -> nn.Module:
    """A transformers causal LM from a checkpoint directory, in its stored dtype by default.

    Safetensors only (never pickle): the directory is validated by globe.io first (config.json values, shards,
    headers; a .bin-only directory is refused with how to convert it), loaded with use_safetensors=True, and
    every weight is checked for NaN/Inf. Failures are ModelDirError / NumericalError naming the directory."""
    import transformers
    from globe.io import open_checkpoint
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        from globe.io.shards import missing_config_message
        raise ModelDirError(missing_config_message(path))
    check_source_model(path, "model directory")
    with open_checkpoint(path):
        pass
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                                  trust_remote_code=False)
    except Exception as exc:            # whatever transformers rejects in the user's directory (validated above)
        raise ModelDirError(f"transformers cannot load {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
                            f"); check its config.json and weights") from None
    check_finite_weights(model, path)
    return (model.to(device) if device else model).eval()


def check_source_model(path: str | Path, flag: str = "MODEL_DIR") -> Path:
    """A source model directory, before any work: it exists with config.json, asks for no custom code, and is
    not a GloBE compressed checkpoint (which is no source to fit or compress). Errors name the argument."""
    from globe.formats.checkpoint import is_compressed
    from globe.formats.validate import refuse_remote_code
    from globe.io.shards import missing_config_message
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{flag} {path} does not exist; pass a Hugging Face checkpoint directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(missing_config_message(path))
    refuse_remote_code(path)
    if is_compressed(path):
        raise ModelDirError(f"{flag} {path} is a GloBE compressed checkpoint, not a source model: pass the original "
                            f"model directory it was compressed from")
    return path


def check_finite_weights(model: nn.Module, where: Path) -> None:
    """NumericalError naming the first parameter or buffer of `model` that holds NaN/Inf."""
    from globe.errors import NumericalError
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"tensor {name!r} of {where} holds NaN/Inf values; the checkpoint is damaged, "
                                 f"re-download or repair it")


def source_dir(model: nn.Module) -> Path | None:
    """The directory a model was loaded from, when it is a local directory."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop keys whose tensor aliases an earlier one (tied weights); contiguous CPU tensors, same dtype."""
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata(tmp)                     # the same tensors give the same bytes
    atomic_write(path, write)


def copy_side_files(src: Path | None, out: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer / generation files present in `src` to `out` (atomically); returns the names copied."""
    if src is None:
        return []
    copied = []
    for name in SIDE_FILES:
        if name in skip or not (src / name).is_file() or (src / name).resolve() == (out / name).resolve():
            continue
        atomic_write(out / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))
        copied.append(name)
    return copied


def move_tree_files(staging: Path, out: Path) -> list[str]:
    """Move every file of `staging` (same filesystem) into `out` with atomic_write; returns the names."""
    names = []
    for file in sorted(p for p in staging.iterdir() if p.is_file()):
        atomic_write(out / file.name, lambda tmp, f=file: os.replace(f, tmp))
        names.append(file.name)
    return names


def staging_dir(out: Path) -> tempfile.TemporaryDirectory:
    """A temporary directory inside `out` (so moves out of it are renames on one filesystem)."""
    out.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=out, prefix=".globe-staging-")


# Files an export owns: never carried over from the output it replaces (a stale shard would mix two exports).
OWNED = ("config.json", "globe_config.json", "globe_compressed.json", "globe_model.safetensors", "banks.safetensors")


def _owned(name: str) -> bool:
    return name in OWNED or name.endswith((".safetensors", ".safetensors.index.json")) or name in SIDE_FILES


def staged_output(out: Path) -> Path:
    """A new staging directory beside `out` (same filesystem, so it can be renamed over it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{outputs.SWAP_STAGING}"))


def carry_over(out: Path, staging: Path) -> list[str]:
    """Hard-link into `staging` what `out` holds that the export does not own: the user's own files and the
    output lock (a hard link keeps the same flock); crash debris and the export's files of the old version stay
    behind. Returns the names carried."""
    carried = []
    if not out.is_dir():
        return carried
    for entry in sorted(out.iterdir()):
        name = entry.name
        if (staging / name).exists() or outputs._is_debris(entry) or (name != outputs.LOCK_NAME and _owned(name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / name, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, staging / name, follow_symlinks=False)
        carried.append(name)
    return carried


def swap_in(staging: Path, out: Path) -> None:
    """Make the complete directory `staging` the output `out` in one step: rename the old `out` aside, rename
    `staging` in, remove the old one. A crash between the renames leaves the old output set aside, which the next
    run on `out` renames back (globe.core.outputs.recover_swap); after them, the new one."""
    carry_over(out, staging)
    _fsync_dir(staging)
    if out.exists():
        old = out.parent / f".{out.name}{outputs.SWAP_OLD}{os.getpid()}-{time.time_ns()}"
        os.rename(out, old)                    # 1: the old output aside
        os.rename(staging, out)                # 2: the new one in
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
