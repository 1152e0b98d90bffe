"""Weight-only group quantization (base layer: imports only torch, globe.core and globe.errors).

    globe.quant.config    QuantConfig (method, bits 2/3/4/8, group along the last axis, format_version)
    globe.quant.packing   pack_bits / unpack_bits: n codes of b bits in exactly ceil(n b / 8) uint8 bytes
    globe.quant.tensor    QuantizedTensor (packed codes, fp16 scales and zeros, shape, bits, group):
                          dequantize(), nbytes
    globe.quant.registry  QUANTIZERS by name and quantize(weights, config, hessian=None)
    globe.quant.rtn / gptq / hqq   the quantizers, each registering itself

    qt = quantize(w, QuantConfig(method="gptq", bits=3, group=64), hessian=H)   # w [..., r, c], H [..., c, c]
    w_hat, size = qt.dequantize(), qt.nbytes
"""
from globe.quant import gptq, hqq, rtn  # noqa: F401  (registration)
from globe.quant.config import BITS, QUANT_FORMAT_VERSION, QuantConfig
from globe.quant.packing import pack_bits, packed_bytes, unpack_bits
from globe.quant.registry import NEEDS_HESSIAN, QUANTIZERS, quantize, register
from globe.quant.tensor import QuantizedTensor

__all__ = ["BITS", "NEEDS_HESSIAN", "QUANTIZERS", "QUANT_FORMAT_VERSION", "QuantConfig", "QuantizedTensor",
           "pack_bits", "packed_bytes", "quantize", "register", "unpack_bits"]
