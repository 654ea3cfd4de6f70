"""4-bit checkpoints quantized elsewhere (config.json's quantization_config), repacked at load into
formats.py's int4 layout (codes along K, two a byte; scales and zeros per group of K).

  AWQ (quant_method "awq", version "gemm", zero_point): qweight int32 [K, N / 8], eight output
      columns a word in the order 0 2 4 6 1 3 5 7 (nibble i holds column ORDER[i]); qzeros int32
      [K / group, N / 8] packed alike; scales [K / group, N].
  GPTQ (quant_method "gptq", desc_act false): qweight int32 [K / 8, N], eight consecutive input rows a
      word (nibble i holds row 8r + i); qzeros int32 [K / group, N / 8], consecutive columns, stored
      minus one (the original GPTQ format; checkpoint_format "gptq_v2" stores them as they are);
      scales [K / group, N]; g_idx [K] must be k // group.
Both: w[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n].
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from .formats import GROUP_SIZE, INT4_BLOCK, INT4_LAYOUT, QUANT_KINDS, QuantizedWeight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i]


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    method: str   # "awq", "gptq", or "edgellm" (written by `edgellm quantize`: formats.py's layouts as they are)
    group: int    # 0: one group over all of K
    zeros_minus_one: bool = False  # GPTQ's original format
    kind: str = "int4"  # the format it loads as


def checkpoint_quantization(hf: dict) -> CheckpointQuantization | None:
    """config.json's quantization_config, checked (UnsupportedModelError naming what is not supported)."""
    spec = hf.get("quantization_config")
    if not spec:
        return None
    method = str(spec.get("quant_method", "")).lower()
    if method == "edgellm":
        kind = spec.get("kind")
        if kind not in QUANT_KINDS:
            raise UnsupportedModelError(f"edgellm checkpoint of unknown kind {kind!r}; supported: {', '.join(QUANT_KINDS)}")
        if kind == "int4" and spec.get("int4_layout") != INT4_LAYOUT:
            raise UnsupportedModelError(f"edgellm int4 checkpoint in layout {spec.get('int4_layout')!r}, not this "
                                        f"version's {INT4_LAYOUT!r}: quantize the full-precision model again")
        return CheckpointQuantization("edgellm", int(spec.get("group_size", GROUP_SIZE)), kind=kind)
    if method not in ("awq", "gptq"):
        raise UnsupportedModelError(f"unsupported quant_method {spec.get('quant_method')!r}; supported: awq, gptq, "
                                    "edgellm (or quantization= at load on a full-precision checkpoint)")
    bits = spec.get("bits", spec.get("w_bit"))
    if bits != 4:
        raise UnsupportedModelError(f"{method} checkpoints with {bits} bits are not supported; only 4")
    group = int(spec.get("group_size", spec.get("q_group_size", 128)))
    if method == "awq":
        if str(spec.get("version", "gemm")).lower() != "gemm":
            raise UnsupportedModelError(f"AWQ version {spec.get('version')!r} is not supported; only 'gemm'")
        if not spec.get("zero_point", True):
            raise UnsupportedModelError("AWQ without zero_point is not supported")
        return CheckpointQuantization("awq", max(group, 0))
    if spec.get("desc_act"):
        raise UnsupportedModelError("GPTQ with desc_act=true (act-order) is not supported; re-quantize with desc_act=false")
    fmt = str(spec.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} is not supported")
    return CheckpointQuantization("gptq", max(group, 0), zeros_minus_one=fmt == "gptq")


def packed_names(weight_name: str, method: str) -> tuple[str, ...]:
    """The tensors a quantized checkpoint stores for a linear `<prefix>.weight`."""
    prefix = weight_name.removesuffix(".weight")
    if method == "edgellm":
        return prefix + ".qweight", prefix + ".scales", prefix + ".zeros"
    names = (prefix + ".qweight", prefix + ".qzeros", prefix + ".scales")
    return names + ((prefix + ".g_idx",) if method == "gptq" else ())


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 8] codes, nibble i (bits 4i .. 4i + 3) at index i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return (words.to(torch.int32)[..., None] >> shifts) & 0xF


def _columns(words: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """[R, W] words of eight columns each -> [R, 8 W] codes in column order."""
    codes = _nibbles(words)
    if order is not None:  # nibble i holds column order[i]
        codes = codes[..., torch.tensor([order.index(j) for j in range(8)])]
    return codes.reshape(words.shape[0], -1)


def unpack(spec: CheckpointQuantization, name: str, tensors: list[torch.Tensor], out_features: int,
           in_features: int) -> QuantizedWeight:
    """One linear weight ([out, in]) from its stored tensors (packed_names order); ModelLoadError naming
    the tensor whose shape does not fit."""
    n, k = out_features, in_features
    if spec.method == "edgellm":
        return _stored(spec, name, tensors, n, k)
    qweight, qzeros, scales = tensors[:3]
    group = spec.group or k
    groups = -(-k // group)
    prefix = name.removesuffix(".weight")
    expect = {"scales": (groups, n), "qzeros": (groups, n // 8),
              "qweight": (k, n // 8) if spec.method == "awq" else (k // 8, n)}
    for suffix, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expect[suffix]:
            raise ModelLoadError(f"tensor {prefix}.{suffix} has shape {tuple(tensor.shape)}; a {spec.method} "
                                 f"weight of {n} x {k} in groups of {group} needs {expect[suffix]}")
    if n % 8 or k % 8 or group % 2:
        raise ModelLoadError(f"{prefix}: {spec.method} weights need dimensions divisible by 8 and an even group")
    if spec.method == "awq":
        codes = _columns(qweight, AWQ_ORDER).t()        # [N, K]
        zeros = _columns(qzeros, AWQ_ORDER).t()         # [N, groups]
    else:
        g_idx = tensors[3]
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group):
            raise ModelLoadError(f"tensor {prefix}.g_idx is not k // group_size: act-order checkpoints are not supported")
        codes = _nibbles(qweight).permute(1, 0, 2).reshape(n, k)  # word r, nibble i -> input row 8r + i
        zeros = _columns(qzeros, None).t()
        if spec.zeros_minus_one:  # stored as (z - 1) & 0xF
            zeros = (zeros + 1) & 0xF
    return QuantizedWeight("int4", pack_int4(codes.to(torch.uint8)), scales.t().contiguous(),
                           zeros.to(scales.dtype).contiguous(), k, group)


def _stored(spec: CheckpointQuantization, name: str, tensors, n: int, k: int) -> QuantizedWeight:
    """formats.py's layout as `edgellm quantize` wrote it: shapes checked, taken as they are."""
    data, scales, zeros = tensors
    groups = -(-k // spec.group)
    expect = {"qweight": (n, -(-k // INT4_BLOCK) * INT4_BLOCK // 2) if spec.kind == "int4" else (n, k),
              "scales": (n, groups) if spec.kind == "int4" else (n,)}
    if spec.kind == "int4":
        expect["zeros"] = (n, groups)
    if spec.kind == "int8":
        expect["zeros"] = (n,)
    prefix = name.removesuffix(".weight")
    for suffix, tensor in (("qweight", data), ("scales", scales), ("zeros", zeros)):
        if suffix in expect and (tensor is None or tuple(tensor.shape) != expect[suffix]):
            got = None if tensor is None else tuple(tensor.shape)
            raise ModelLoadError(f"tensor {prefix}.{suffix} has shape {got}; a {spec.kind} weight of {n} x {k} needs "
                                 f"{expect[suffix]}")
    return QuantizedWeight(spec.kind, data, scales, zeros if spec.kind != "fp8" else None, k,
                           spec.group if spec.kind == "int4" else 0)


def save_packed(weight: QuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors `edgellm quantize` writes for one linear weight (read back by _stored)."""
    out = {prefix + ".qweight": weight.data.contiguous(), prefix + ".scales": weight.scales.contiguous()}
    if weight.zeros is not None:
        out[prefix + ".zeros"] = weight.zeros.contiguous()
    return out
