"""Split-K for the GEMV (kernels/gemv.py): a matrix with few output tiles (a narrow layer at 16-64
rows on a big GPU: the 8B shape's o and down projections in int4 make 64 tiles of 64 features for 132
SMs) has its K divided among SPLIT_K programs a tile, so every SM streams weights.

The parts are added in one fixed order, with no floating-point atomics (the determinism issue): each
program stores its part to a workspace, counts itself in with an integer atomic, and the one that
counts last adds the SPLIT_K parts in split order (0, 1, ...) and runs the epilogue; the others store
nothing. The sum is the same whichever program finishes last, so it is the same run after run, and
the split count depends on the matrix alone (a tile's entry, auto_splits), never on the batch, so a
row's bits do not depend on its batch either. The counters are left at zero by the last program, ready for the next
kernel, which cannot reach them before this one has finished (a PDL kernel's counting comes after its
wait). No op of its own, so no `_ref` here: a split GEMV's reference is gemv.gemv_ref."""

from __future__ import annotations

import torch

from ._triton import tl, triton

COUNTERS = 1 << 16  # tiles (output blocks x row blocks) one launch may split: 256 KB of int32 a device
_counters: dict = {}


@triton.jit
def split_k_sum(acc, ws_ptr, cnt_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's part acc [BLOCK_M, BLOCK_N] of its tile (program ids 0 and 1; the split is id 2)
    -> (the whole sum in split order where this program came last, else zeros; whether it came last, for
    each of the tile's rows)."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    at = (tile * SPLIT_K * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(ws_ptr + at + tl.program_id(2) * (BLOCK_M * BLOCK_N), acc)
    tl.debug_barrier()  # (every thread's part stored before the count that releases it)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    # (whether it came last, as a tile and per row: the interpreter takes no scalar mask for a block)
    last = (tl.zeros([BLOCK_M], dtype=tl.int32) + arrived) == SPLIT_K - 1
    last_tile = (tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32) + arrived) == SPLIT_K - 1
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + at + split * (BLOCK_M * BLOCK_N), mask=last_tile, other=0.0, cache_modifier=".cg")
    tl.store(cnt_ptr + tile, 0, mask=arrived == SPLIT_K - 1)
    return total, last


def counters(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed counters (made on first use; None while a CUDA graph is being captured and
    there are none yet: made inside the capture they would belong to the graph; the engine's captures
    run their steps eagerly first). One set a device: the GEMVs that split K run on one stream at a
    time, one after another (a captured step replays on the stream that launches it)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]


def k_split(k: int, block_k: int, wanted: int) -> tuple[int, int]:
    """(splits, columns each covers) for `wanted` splits of K: each a whole number of K tiles (so an int4
    tile stays in one group), none empty (so there may be fewer than wanted)."""
    chunk = triton.cdiv(triton.cdiv(k, max(1, wanted)), block_k) * block_k
    return triton.cdiv(k, chunk), chunk


def auto_splits(programs: int, k: int, block_k: int, sms: int) -> int:
    """RunSettings.gemv_split "auto": the split that gives about two programs an SM to a matrix whose
    output tiles alone leave SMs idle (a function of the matrix and tile only, never of the batch)."""
    return max(1, min(16, k // block_k, round(2 * sms / programs)))


_sms: dict = {}


def sm_count(device: torch.device) -> int:
    """The device's SMs (the H100's 132 off CUDA, so the interpreter splits as the GPU would)."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sms:
        _sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sms[index]
