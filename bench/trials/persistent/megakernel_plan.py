"""What the persistent decode kernel (kernels/megakernel.py) needs to run one model: whether it can
(supports), the weight-address table and scratch buffers (make_plan), each stage's tile sizes for a
number of programs, and the stage counters a complete launch leaves (expected_counts)."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from edgellm.kernels._triton import pow2, triton

STAGES = 5  # per layer; then one merge counter per query head


class Plan(NamedTuple):
    """What one model's persistent step needs besides the step's inputs: the weight-address table,
    scratch buffers (reused every step), tile sizes and the number of programs."""
    table: torch.Tensor      # [layers, COLUMNS] int64 data pointers
    keep: tuple              # the tensors whose pointers the table holds (kept alive)
    residual: torch.Tensor   # [H] the residual stream; after a step: the last layer's output + residual
    q: torch.Tensor
    attn: torch.Tensor
    h: torch.Tensor
    parts: torch.Tensor      # [NQ * SPLITS, HD] float32: attention slices
    lse: torch.Tensor        # [NQ * SPLITS] float32
    counters: torch.Tensor   # [layers * (STAGES + NQ)] int32, zeroed before each launch
    flag: torch.Tensor       # [1] int32: a wait gave up
    programs: int
    constants: dict
    cache: torch.Tensor      # the KV cache [layers, 2, slots, kv_heads, capacity, head_dim] the table points into
    warps: int = 8


# Keys per attention slice, at least. Each slice is one program's; its first block is loaded before
# the wait for stage A. H100 (bench/persistent.py, 135M shape, 129 keys): one slice of 129 keys per
# head 6.9 us for the stage (three dependent block loads), two slices of 65 keys 6.7 us, slices of 32
# keys (one block each, then the merge) 6.0 us.
MIN_KEYS = 32
CHUNK = 8192  # weight elements per load of a tile (16 KB in fp16); two in flight per program


def _k_block(rows: int, k: int, chunk: int) -> int:
    return max(16, min(pow2(k), chunk // rows))


def _tile_sizes(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, programs: int,
                chunk: int = CHUNK) -> dict:
    """Tiles per stage close to (at most) the number of programs, each a power of two in size."""
    half = head_dim // 2
    pairs = half
    while pairs > 1 and (heads + 2 * kv_heads) * (half // pairs) * 2 <= programs:
        pairs //= 2
    splits = 1
    while heads * splits * 2 <= programs and splits < 16:
        splits *= 2
    rows = pow2(triton.cdiv(hidden, programs))
    block_i = pow2(triton.cdiv(inter, programs))
    return dict(PAIRS=pairs, SPLITS=splits, BN_O=rows, BI=block_i, BN_D=rows,
                BK_A=_k_block(2 * pairs, hidden, chunk), BK_O=_k_block(rows, heads * head_dim, chunk),
                BK_G=_k_block(2 * block_i, hidden, chunk), BK_D=_k_block(rows, inter, chunk), BLOCK_N=64,
                MIN_KEYS=MIN_KEYS)


def supports(cfg, weights, dtype: torch.dtype) -> str | None:
    """None if the persistent step can run this model, else why not."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (float16/bfloat16 only)"
    checks = {"norm": cfg.norm == "rms", "mlp": cfg.mlp == "gated" and cfg.activation == "silu",
              "positions": cfg.positions == "rope", "qk_norm": not cfg.qk_norm, "embed_scale": cfg.embed_scale == 1.0,
              "sliding windows": not any(cfg.layer_window(i) for i in range(cfg.num_decoder_layers)),
              "rotary": cfg.rotary_dim == cfg.head_dim and cfg.mrope_section is None,
              "head_dim": cfg.head_dim >= 8 and cfg.head_dim & (cfg.head_dim - 1) == 0}
    missing = [name for name, ok in checks.items() if not ok]
    lw = weights.layers[0]
    if lw.qkv_bias is not None or lw.o_bias is not None or lw.attn_out_norm is not None \
            or lw.mlp_out_norm is not None:
        missing.append("biases or sandwich norms")
    if any(not isinstance(w, torch.Tensor) or w.dtype != dtype or not w.is_contiguous()
           for layer in weights.layers for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)):
        missing.append("plain contiguous weights (not quantized)")
    return ", ".join(missing) if missing else None


def make_plan(cfg, weights, cache: torch.Tensor, programs: int | None = None, tile_programs: int | None = None,
              chunk: int = CHUNK) -> Plan:
    """The plan of one engine's weights and KV cache (the runner's cache.data) for `programs` programs
    (default: one per SM; one under the interpreter). tile_programs: cut the stages into tiles as for
    that many programs (tests: many small tiles and attention slices, run by one interpreted program)."""
    device, dtype = cache.device, cache.dtype
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if programs is None:
        programs = 1 if interpret or device.type != "cuda" else \
            torch.cuda.get_device_properties(device).multi_processor_count
    keep = tuple((lw.input_norm, lw.qkv, lw.o_proj, lw.post_norm, lw.gate_up, lw.down) for lw in weights.layers)
    table = torch.tensor([[w.data_ptr() for w in row] + [cache[i].data_ptr()] for i, row in enumerate(keep)],
                         dtype=torch.int64, device=device)
    hidden, inter = cfg.hidden_size, weights.layers[0].down.shape[1]
    empty = lambda n, kind=dtype: torch.zeros(n, dtype=kind, device=device)  # noqa: E731
    sizes = _tile_sizes(hidden, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, inter,
                        tile_programs or programs, chunk)
    constants = dict(H=hidden, NQ=cfg.num_attention_heads, NKV=cfg.num_kv_heads, HD=cfg.head_dim, I=inter, **sizes,
                     INTERPRET=interpret)  # the interpreter's waits use its atomics, not inline PTX
    slices = cfg.num_attention_heads * sizes["SPLITS"]
    return Plan(table, keep, empty(hidden), empty(cfg.q_size), empty(cfg.q_size), empty(inter),
                empty((slices, cfg.head_dim), torch.float32), empty(slices, torch.float32),
                empty(len(keep) * (STAGES + cfg.num_attention_heads), torch.int32), empty(1, torch.int32),
                programs, constants, cache)


def expected_counts(plan: Plan) -> list[list[int]]:
    """What each layer's five stage counters (plan.counters.view(layers, -1)[:, :5]) hold after a complete
    launch: one arrival per tile; attention: one per head, by the tile that completed it."""
    c = plan.constants
    per_layer = [(c["NQ"] + 2 * c["NKV"]) * (c["HD"] // 2 // c["PAIRS"]), c["NQ"], triton.cdiv(c["H"], c["BN_O"]),
                 triton.cdiv(c["I"], c["BI"]), triton.cdiv(c["H"], c["BN_D"])]
    return [per_layer] * plan.cache.shape[0]


def stage_counts(plan: Plan) -> list[list[int]]:
    """The five stage counters of each layer after the latest launch (compare with expected_counts)."""
    return plan.counters.view(plan.cache.shape[0], -1)[:, :STAGES].tolist()
