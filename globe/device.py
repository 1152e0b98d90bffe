"""Devices and dtypes: `auto|cpu|cuda|mps` resolution, the compute dtype of a checkpoint on a device, and peak
memory of this process (CPU RSS, CUDA, MPS) in one place.

    device = resolve_device("auto")              # cuda > mps > cpu
    dtype = compute_dtype(model_dir, device)     # the checkpoint's dtype where the device supports it
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
from pathlib import Path

import torch

from globe.errors import ConfigError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device) -> torch.device:
    """torch.device for a name in DEVICES (or any torch device string); "auto" prefers cuda, then mps, then cpu.

    On MPS, ops without an MPS kernel fall back to the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1 unless set)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r}: torch sees no such CUDA device on this machine; use --device cpu "
                          f"(or auto)")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine; use --device cpu (or auto)")
    if device.type == "mps":
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return device


@contextlib.contextmanager
def one_cpu_thread(device: str | torch.device):
    """torch on one intra-op thread while small sequential steps run on the CPU (restored afterwards): on a busy
    machine each small matmul waits for the slowest of several threads (sampling, distillation)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def acc_dtype(device: str | torch.device) -> torch.dtype:
    """Accumulation dtype of sums and normal equations on `device`: float64, but float32 on MPS (no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `device` computes in `dtype` (bf16 needs Ampere+ on CUDA, macOS 14+ on MPS)."""
    if dtype not in (torch.bfloat16, torch.float16) or device.type == "cpu":
        return True
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    try:
        torch.ones(2, dtype=dtype, device=device).sum().item()
        return True
    except (RuntimeError, TypeError):
        return False


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The dtype recorded in a checkpoint's config.json (`dtype` or `torch_dtype`), None when absent."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):                       # missing, not JSON, not UTF-8: the loader reports it
        return None
    if not isinstance(config, dict):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def compute_dtype(model_dir: str | Path, device: torch.device, requested: str = "auto") -> torch.dtype | str:
    """dtype to load a model in: `requested`, or the checkpoint's own dtype, float32 where the device lacks it."""
    if requested != "auto":
        return getattr(torch, requested)
    stored = checkpoint_dtype(model_dir)
    if stored is None:
        return "auto"
    if not supports_dtype(device, stored):
        log.warning("%s does not support %s: computing in float32", device, stored)
        return torch.float32
    return stored


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak memory in MiB: CUDA peak allocated, MPS driver-allocated now (MPS keeps no peak), else peak RSS."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    if dev.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
