"""A quantized copy of a fit (bank and adapters rounded to nearest with group scales, as FamilyFit.quant holds them
after the fit's quantize stage), cheap enough for tests of the format and the runtime."""
from __future__ import annotations

import dataclasses

from globe.core.result import FitResult
from globe.quant import QuantConfig, quantize


def quantized_result(result: FitResult, bits: int = 4, group: int = 8, method: str = "rtn") -> FitResult:
    """result with every family's bank and adapters quantized (bank / adapters then hold the dequantized values)."""
    cfg = QuantConfig(method=method, bits=bits, group=group)
    families = {}
    for name, fam in result.families.items():
        qbank, qadapters = quantize(fam.bank.float(), cfg), quantize(fam.adapters.float(), cfg)
        metrics = {**fam.metrics, "quant": cfg.to_dict()}
        families[name] = dataclasses.replace(fam, bank=qbank.dequantize(), adapters=qadapters.dequantize(),
                                             quant={"bank": qbank, "adapters": qadapters}, metrics=metrics)
    return dataclasses.replace(result, families=families)
