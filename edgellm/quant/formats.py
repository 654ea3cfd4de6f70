"""Packed weight formats, one internal layout per kind, each the layout the dequantizing GEMV
(kernels/gemv.py) reads best: rows are output features, K runs along memory.

  int8  data uint8 [N, K], scales and zeros [N]: w = (q - z) * s (asymmetric, per output channel:
        on the default model +1.18% perplexity symmetric, -1.4% asymmetric)
  int4  data uint8 [N, 16 ceil(K / 32)], two codes a byte in blocks of 32 columns: byte j of a block
        holds its column j (low nibble) and column 16 + j (high), so the low nibbles of 16 bytes
        meet 16 consecutive entries of x, as do the high ones (the GEMV loads x as it lies);
        scales and zeros [N, ceil(K / group)]: w = (q - z) * s (asymmetric, per group of `group`
        along K, a multiple of 32 for the kernels; the last group may be shorter, e.g. SmolLM2's
        K = 576 = 4 x 128 + 64)
  fp8   data float8_e4m3fn [N, K], scales [N]: w = q * s (per output channel)

scales / zeros are in the compute dtype. `quantize` is plain round-to-nearest; checkpoints quantized
elsewhere (AWQ, GPTQ) are repacked into the same layouts (quant/checkpoints.py).
"""

from __future__ import annotations

import dataclasses

import torch

QUANT_KINDS = ("int8", "int4", "fp8")
GROUP_SIZE = 128
INT4_BLOCK = 32  # columns a run of 16 int4 bytes holds (see int4 above)
INT4_LAYOUT = "blocks32"  # the name `edgellm quantize` records for that layout
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclasses.dataclass
class QuantizedWeight:
    """A linear layer's weight [out_features, in_features] in one of the packed formats above."""
    kind: str
    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int
    group: int = 0  # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        parts = [self.data, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device) -> "QuantizedWeight":
        return dataclasses.replace(self, data=self.data.to(device), scales=self.scales.to(device),
                                   zeros=None if self.zeros is None else self.zeros.to(device))

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The output features `index` (a reduced vocabulary's LM head rows)."""
        return dataclasses.replace(self, data=self.data.index_select(0, index).contiguous(),
                                   scales=self.scales.index_select(0, index).contiguous(),
                                   zeros=None if self.zeros is None else self.zeros.index_select(0, index).contiguous())


def packed_bytes(kind: str, n: int, k: int, dtype_bytes: int = 2, group: int = GROUP_SIZE) -> int:
    """Bytes of a [n, k] weight in `kind` (what the memory plan counts)."""
    if kind == "int4":
        return n * _groups(k, INT4_BLOCK) * INT4_BLOCK // 2 + 2 * n * _groups(k, group) * dtype_bytes
    return n * k + n * dtype_bytes * (2 if kind == "int8" else 1)


def _groups(k: int, group: int) -> int:
    return -(-k // group)


def _pad_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, groups, group]: a ragged last group padded with its own first column (so min,
    max and amax of the group are unchanged)."""
    n, k = w.shape
    pad = _groups(k, group) * group - k
    if pad:
        w = torch.cat([w, w[:, k - (k % group):k - (k % group) + 1].expand(n, pad)], dim=1)
    return w.reshape(n, -1, group)


def quantize(weight: torch.Tensor, kind: str, *, group: int = GROUP_SIZE, dtype: torch.dtype | None = None
             ) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight (computed in float32; scales in `dtype`,
    default the weight's)."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantization {kind!r}; supported: {', '.join(QUANT_KINDS)}")
    dtype = dtype or weight.dtype
    w = weight.float()
    n, k = w.shape
    if kind == "int8":
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((high - low) / 255.0).clamp(min=1e-8)
        zero = torch.round(-low / scale).clamp(0, 255)
        q = torch.round(w / scale[:, None] + zero[:, None]).clamp(0, 255).to(torch.uint8)
        return QuantizedWeight("int8", q, scale.to(dtype), zero.to(dtype), k)
    if kind == "fp8":
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-8)
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight("fp8", q, scale.to(dtype), None, k)
    grouped = _pad_groups(w, group)
    scale, zero = int4_group_params(grouped.amin(dim=2), grouped.amax(dim=2))
    codes = int4_codes(grouped, scale, zero).reshape(n, -1)[:, :k]
    return QuantizedWeight("int4", pack_int4(codes.to(torch.uint8)), scale.to(dtype), zero.to(dtype), k, group)


def int4_group_params(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 scale and zero that map a group's range [low, high] onto the codes 0..15."""
    scale = ((high - low) / 15.0).clamp(min=1e-8)
    return scale, torch.round(-low / scale).clamp(0, 15)


def int4_codes(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, groups, group] weights -> their float codes 0..15 under per-group scale and zero."""
    return torch.round(grouped / scale[..., None] + zero[..., None]).clamp(0, 15)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, 16 ceil(K / 32)] uint8: in each block of 32 columns (K padded with
    zero codes), byte j holds column j in its low nibble and column 16 + j in its high."""
    n, k = codes.shape
    codes = codes.to(torch.uint8)
    pad = _groups(k, INT4_BLOCK) * INT4_BLOCK - k
    if pad:
        codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
    blocks = codes.reshape(n, -1, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, -1).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """pack_int4's inverse: [N, K] uint8 codes."""
    blocks = packed.reshape(packed.shape[0], -1, 1, INT4_BLOCK // 2)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(packed.shape[0], -1)[:, :k]


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype` (computed in float32): what the references and prefill multiply by."""
    if qw.kind == "fp8":
        return (qw.data.float() * qw.scales.float()[:, None]).to(dtype)
    if qw.kind == "int8":
        return ((qw.data.float() - qw.zeros.float()[:, None]) * qw.scales.float()[:, None]).to(dtype)
    codes = unpack_int4(qw.data, qw.in_features).float()
    column_group = torch.arange(qw.in_features, device=codes.device) // qw.group
    return ((codes - qw.zeros.float()[:, column_group]) * qw.scales.float()[:, column_group]).to(dtype)
