"""The up-front memory check: what an engine will allocate, against what its device has free.

An engine allocates everything it keeps when it is built or on first use: weights, the KV cache,
the RoPE table, LoRA stacks, the static buffers and activations of the prefill and decode CUDA
graphs, and whatever its owner adds beside it (the KV store's device tier). Limits whose total
cannot fit fail here, before the weights load, with a ConfigurationError that names the bytes and
the limit to lower, instead of an allocator error halfway through loading or during a capture.

The activation estimates are upper bounds of what the decoder forward (engine/model.py) holds at
once; tests/engine/test_memory.py (on a GPU) checks them against the allocator's measured peak.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import ConfigurationError
from .config import EngineConfig
from .graphs import graph_batch_sizes, prefill_bucket
from .lora import GROUPS, module_shapes, stack_rank
from .verify import tree_buckets
from .weights import weight_bytes

MARGIN_BYTES = 256 << 20  # CUDA-graph executables, Triton code, allocator rounding
MARGIN_FRACTION = 0.05
# torch gives each (cuBLAS handle, stream) pair a workspace of up to 32 MiB (Hopper), kept for the
# process's life; the engine's matmuls run on three streams: the caller's, the graph warm-up stream
# and the capture stream (graphs.py).
CUBLAS_WORKSPACES = 3 * (32 << 20)


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    what: str
    nbytes: int
    lower: str  # the setting that shrinks it ("" for none)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    items: tuple[MemoryItem, ...]
    kv_bytes_per_position: int  # KV cache + RoPE bytes per position of max_kv_cache_capacity

    @property
    def margin(self) -> int:
        return max(MARGIN_BYTES, int(MARGIN_FRACTION * sum(i.nbytes for i in self.items)))

    @property
    def total(self) -> int:
        return sum(i.nbytes for i in self.items) + self.margin

    def describe(self) -> str:
        parts = [f"{i.what} {gib(i.nbytes)}" for i in sorted(self.items, key=lambda i: -i.nbytes) if i.nbytes]
        return ", ".join(parts + [f"margin {gib(self.margin)}"])


def gib(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def engine_memory_plan(cfg: EngineConfig, dtype: torch.dtype, *, prefill_chunk: int, graphs: bool,
                       cuda: bool = True, max_lora_rank: int = 0, max_loras: int = 0, max_verify_tokens: int = 0,
                       extra: dict[str, int] | None = None) -> MemoryPlan:
    """Bytes an engine of `cfg` will hold on its device (cuda: a CUDA one), item by item (an upper bound)."""
    el = torch.empty(0, dtype=dtype).element_size()
    h, q, kv, ffn, vocab = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.output_vocab_size
    batch, capacity = cfg.max_supported_batch_size, cfg.max_kv_cache_capacity
    weights = weight_bytes(cfg, dtype)
    # LinearKVCache: [layers, 2, batch + 1, kv_heads, capacity, head_dim] (+1: the scratch slot);
    # the RoPE table: cos and sin, float32, [capacity, rotary_dim / 2] each.
    kv_per_position = cfg.num_decoder_layers * 2 * (batch + 1) * kv * el + cfg.rotary_dim * 4
    lora = 0
    if max_lora_rank:
        rank = stack_rank(max_lora_rank)
        shapes = module_shapes(cfg)
        per_layer = sum(len(m) * rank * shapes[m[0]][1] + sum(shapes[x][0] for x in m) * rank
                        for m in GROUPS.values())
        lora = cfg.num_decoder_layers * max_loras * per_layer * el
    # One prefill chunk: `batch` rows of up to `width` tokens. What the forward holds at its peak per
    # token (residual, normed input, qkv, attention output, o output, gate_up, act(gate) * up, down output),
    # the chunk's input embeddings (static, with graphs), and the last tokens' logits (dtype, float32).
    # With graphs, twice the activations: the graph pool keeps one set, and the eager warm-up before
    # a capture takes another from torch's ordinary cache (measured: tests/engine/test_memory.py).
    width = min(prefill_chunk, cfg.max_supported_input_length)
    if graphs:
        width = prefill_bucket(width)
    tokens = batch * width
    per_token = 4 * h + 2 * q + 2 * kv + 3 * ffn
    logits_row = vocab * (el + 4)
    prefill = tokens * (per_token * (2 if graphs else 1) + h) * el + 2 * batch * logits_row
    # Decode: one graph per padded batch size (and LoRA on/off), each keeping its logits; the
    # activations of a few rows are small next to those.
    sizes = graph_batch_sizes(batch) if graphs else [batch]
    decode = sum(sizes) * (2 if max_lora_rank else 1) * (logits_row + 4 * vocab + per_token * el)
    # Verify steps (engine/verify.py): per padded size, a graph per tree bucket keeping logits of
    # every node; their activations (a few dozen tokens) are the prefill's, already counted.
    nodes = sum(tree_buckets(max_verify_tokens)) if graphs else max_verify_tokens
    verify = sum(sizes) * (2 if max_lora_rank else 1) * nodes * (logits_row + 4 * vocab)
    items = [MemoryItem("weights", weights, ""),
             MemoryItem(f"KV cache (max_batch_size {batch} x max_kv_cache_capacity {capacity})",
                        kv_per_position * capacity, "max_kv_cache_capacity or max_batch_size"),
             MemoryItem(f"LoRA stacks (max_loras {max_loras} x max_lora_rank {max_lora_rank})", lora,
                        "max_loras or max_lora_rank"),
             MemoryItem(f"prefill activations and buffers ({batch} rows x {width} tokens)", prefill,
                        "prefill_chunk_size, max_input_length or max_batch_size"),
             MemoryItem("decode graphs' buffers", decode, "max_batch_size"),
             MemoryItem(f"verify graphs' buffers (max_verify_tokens {max_verify_tokens})", verify,
                        "max_verify_tokens or max_batch_size")]
    if cuda:
        items.append(MemoryItem("cuBLAS workspaces", CUBLAS_WORKSPACES, ""))
    items += [MemoryItem(what, int(n), "") for what, n in (extra or {}).items()]
    return MemoryPlan(tuple(items), kv_per_position)


def free_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: the driver's free memory plus what torch's
    caching allocator holds unused; on the CPU, the kernel's MemAvailable. None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(plan: MemoryPlan, device: torch.device, free: int | None) -> None:
    """Raises ConfigurationError when `plan` needs more than `free` bytes (None: unknown, no check)."""
    if free is None or plan.total <= free:
        return
    where = f"memory on {device}" if device.type == "cuda" else "host (CPU) memory"
    biggest = max((i for i in plan.items if i.lower), key=lambda i: i.nbytes)
    advice = f"lower {biggest.lower} (largest part you can shrink: {biggest.what.split(' (')[0]})"
    if "max_kv_cache_capacity" in biggest.lower:
        others = sum(i.nbytes for i in plan.items) - biggest.nbytes
        room = min(free - others - MARGIN_BYTES, int(free / (1 + MARGIN_FRACTION)) - others)  # see margin
        fits = max(0, room // plan.kv_bytes_per_position)
        advice += (f"; with the other limits as they are, max_kv_cache_capacity up to about {fits} fits"
                   if fits >= 1 else "; even the smallest KV cache does not fit with the other limits as they are")
    weights = next(i for i in plan.items if i.what == "weights")
    if weights.nbytes + MARGIN_BYTES > free:
        advice = "the model's weights alone do not fit: use a smaller model or dtype, or a device with more memory"
    raise ConfigurationError(
        f"these engine limits need about {gib(plan.total)} of {where}, but only {gib(free)} is free: "
        f"{plan.describe()}. {advice[0].upper() + advice[1:]}.")
