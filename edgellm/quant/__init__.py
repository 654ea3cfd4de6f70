"""Weight-only quantization: the packed formats and their round-to-nearest quantizers (formats.py).
Kernels that read them: kernels/gemv.py (decode); prefill dequantizes and runs cuBLAS."""

from .formats import GROUP_SIZE, QUANT_KINDS, QuantizedWeight, dequantize, quantize

__all__ = ["GROUP_SIZE", "QUANT_KINDS", "QuantizedWeight", "dequantize", "quantize"]
