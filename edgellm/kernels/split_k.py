"""Split-K for the skinny GEMM (kernels/gemv.py) over more rows than a decode step has: a matrix with
few output tiles (a 2048-wide projection in 64-feature tiles is 32 programs, a quarter of an H100's
SMs) gets its K range cut into SPLIT parts, one program each, so that every SM streams weights.

The parts meet without a second kernel: each program stores its float32 partial tile in a workspace,
meets its CTA at a barrier, and adds 1 to the tile's counter (acquire-release, GPU scope); the program
that brings the counter to SPLIT sums the parts in split order (so the result does not depend on which
program came last), resets the counter to 0 for the next launch, and alone runs the epilogue. The
counters live in one zeroed int32 buffer per device and stream, reused by every launch: launches on a
stream run one after another (a PDL launch touches them only after its wait), so one buffer serves
them all. No op of its own: gemv_ref is the reference of the whole GEMV, split or not.
"""

import torch

from ._triton import tl, triton
from .grid_sync import _load_acquire

# Tiles one launch may split (the counter buffer's length); a launch with more keeps SPLIT = 1.
MAX_SPLIT_TILES = 8192
_counters: dict = {}


def counters(device: torch.device) -> torch.Tensor:
    """The zeroed counter buffer of this device and its current stream (made on first use; a buffer made
    while a CUDA graph is captured belongs to that graph's memory pool and lives as long as this module)."""
    if device.type == "cuda":
        key = (device.index if device.index is not None else torch.cuda.current_device(),
               torch.cuda.current_stream(device).cuda_stream)
    else:  # the interpreter: programs run one after another, one buffer is enough
        key = (device.type, None)
    buf = _counters.get(key)
    if buf is None:
        buf = _counters[key] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return buf


def split_sums(device: torch.device, size: int) -> torch.Tensor:
    """EDGELLM_SPLIT_FIXUP=atomic (an A/B variant): a zeroed float32 buffer per device and stream that
    the parts add into, left zeroed again by the programs that read the sums."""
    key = ("sums", device.type, device.index, torch.cuda.current_stream(device).cuda_stream
           if device.type == "cuda" else None)
    buf = _counters.get(key)
    if buf is None or buf.numel() < size:
        buf = _counters[key] = torch.zeros(max(size, 1 << 22), dtype=torch.float32, device=device)
    return buf


def split_count(tiles: int, k: int, block_k: int, programs: int, min_k_steps: int = 4) -> int:
    """How many parts to cut K into so that about `programs` programs run (a power of two), each part
    still at least min_k_steps K tiles long (shorter ones spend more on the meeting than they stream)."""
    if programs <= tiles or tiles > MAX_SPLIT_TILES:
        return 1
    split = 1
    while split * tiles < programs and triton.cdiv(k, 2 * split * block_k) >= min_k_steps:
        split *= 2
    return split


@triton.jit
def split_k_total(acc, ws_ptr, cnt_ptr, m_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                  INTERPRET: tl.constexpr, ATOMIC: tl.constexpr = False):
    """This program's partial tile acc [BLOCK_M, BLOCK_N] (float32, K part program_id(1) of SPLIT) ->
    (the whole sum, rows it should store): the sum and m_ok in the program that completes the tile, zeros
    and no rows in the others. ws: [SPLIT, tiles, BLOCK_M, BLOCK_N] float32; cnt: the counters."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    at = ws_ptr + tile * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N \
        + tl.arange(0, BLOCK_N)[None, :]
    stride = tl.num_programs(0) * (BLOCK_M * BLOCK_N)
    if ATOMIC:
        tl.atomic_add(at, acc, mask=m_ok[:, None], sem="relaxed", scope="gpu")
    else:
        tl.store(at + part * stride, acc, mask=m_ok[:, None])
    tl.debug_barrier()  # every thread's part of the tile is stored before the release
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    rows = tl.arange(0, BLOCK_M)
    last = rows * 0 + arrived == SPLIT - 1  # (as a vector: the interpreter takes no scalar in a load's mask)
    _load_acquire(cnt_ptr + tile, INTERPRET)  # each thread's loads below come after the other parts' stores
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ATOMIC:
        done = (m_ok & last)[:, None]
        total = tl.load(at, mask=done, other=0.0, cache_modifier=".cg")
        tl.store(at, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=done)
    for s in tl.static_range(0 if ATOMIC else SPLIT):
        other = tl.load(at + s * stride, mask=(m_ok & last & (rows * 0 + part != s))[:, None], other=0.0,
                        cache_modifier=".cg")
        total += tl.where(part == s, acc, other)
    tl.atomic_xchg(cnt_ptr + tile, 0, mask=arrived == SPLIT - 1, sem="relaxed", scope="gpu")  # for the next launch
    return total, m_ok & last
