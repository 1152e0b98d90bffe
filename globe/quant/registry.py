"""The quantizers by name: each is one function (weights, config, hessian) -> QuantizedTensor that registers itself.

    qt = quantize(w, QuantConfig(method="gptq", bits=3, group=64), hessian=H)    # w [..., rows, cols]
    w_hat = qt.dequantize()

`hessian` is [..., cols, cols] (H = sum x x^T of the inputs the weight multiplies), batched like w's leading axes;
methods that need no calibration ignore it.
"""
from __future__ import annotations

from typing import Callable

import torch

from globe.errors import ConfigError, ShapeError
from globe.quant.config import QuantConfig
from globe.quant.tensor import QuantizedTensor

Quantizer = Callable[[torch.Tensor, QuantConfig, "torch.Tensor | None"], QuantizedTensor]
QUANTIZERS: dict[str, Quantizer] = {}
NEEDS_HESSIAN: set[str] = set()


def register(name: str, needs_hessian: bool = False) -> Callable[[Quantizer], Quantizer]:
    def wrap(fn: Quantizer) -> Quantizer:
        QUANTIZERS[name] = fn
        if needs_hessian:
            NEEDS_HESSIAN.add(name)
        return fn
    return wrap


def quantize(weights: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize `weights` [..., rows, cols] with the method config.method names."""
    if config.method not in QUANTIZERS:
        raise ConfigError(f"unknown quantization method {config.method!r}: use one of {', '.join(sorted(QUANTIZERS))}")
    if weights.dim() < 2:
        raise ShapeError(f"quantize: expected a [..., rows, cols] tensor, got {list(weights.shape)}")
    if weights.numel() == 0:                          # the empty base of a plain family (globe.fit.engine.plain)
        return QuantizedTensor.empty(tuple(weights.shape), config.bits, config.group)
    if not bool(torch.isfinite(weights).all()):
        raise ShapeError("quantize: the weights hold NaN/Inf")
    if config.method in NEEDS_HESSIAN:
        cols = weights.shape[-1]
        if hessian is None:
            raise ConfigError(f"quantization method {config.method!r} needs calibration statistics (a Hessian)")
        if hessian.shape[-2:] != (cols, cols) or hessian.shape[:-2] != weights.shape[:-2]:
            raise ShapeError(f"quantize: hessian {list(hessian.shape)} does not fit weights {list(weights.shape)} "
                             f"(expected {[*weights.shape[:-2], cols, cols]})")
    return QUANTIZERS[config.method](weights, config, hessian)
