"""Static buffers of the decode and prefill steps and the registry of their CUDA graphs.

A captured graph replays fixed kernels on fixed memory, so everything the decode step reads or writes
lives in buffers made once per (padded) batch size: the step's input tokens (which are also where its
sampled tokens go, ready for the next step), the rows' cache slots, sampling parameters, seeds and RNG
offsets (advanced inside the step, so each replay draws fresh numbers). Rows beyond the live ones are
padding: they point at the cache's scratch slot and are greedy.

Prefill chunks get graphs too (PrefillKey): a prefill launches a few hundred kernels, and from
Python each launch costs more than the GPU work of a short prompt.

Graphs are keyed by what changes their kernels or the memory they bind (DecodeKey, VerifyKey,
PrefillKey), share one memory pool, and are captured after an eager warm-up on a side stream (which
also compiles every Triton kernel). Whether any row uses a LoRA adapter is part of every key: the
adapters live in fixed stacks and rows pick theirs by a slot index in a static buffer, so one graph
serves every mix of adapters; only whether the LoRA kernels run at all changes the graph.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Hashable

import torch

from ..kernels.attention import PREFILL_SPLIT_MIN_KEYS
from .adapters import any_adapter
from .logit_processing import LOGPROB_WIDTH


@dataclasses.dataclass(frozen=True)
class DecodeKey:
    """A decode step of `size` rows (the padded batch size). processing: the step runs the logit
    processing kernels (engine/logit_processing.py: some slot has penalties, bias or min_p); logprobs:
    it writes its rows' token logprobs (some slot asks for them). part: "step" (the whole step), or one of its
    two halves, "forward" (to the logits) and "sample" (processing and the draw), replayed apart where the
    host sets the rows' token masks between them (engine loop, structured output)."""
    size: int
    lora: bool
    processing: bool = False
    logprobs: bool = False
    part: str = "step"


@dataclasses.dataclass(frozen=True)
class VerifyKey:
    """A speculative verify step of `size` rows, each a token tree of up to `nodes` nodes (engine/verify.py)."""
    size: int
    nodes: int
    lora: bool


@dataclasses.dataclass(frozen=True)
class PrefillKey:
    """A prefill chunk of `rows` x `length` tokens (length: the chunk's bucket, prefill_bucket).
    few_keys: no row sees over PREFILL_SPLIT_MIN_KEYS keys after the chunk, so its attention runs unsplit
    (kernels/attention.py; else split by the cache's capacity). source: "ids" where the step starts from
    token ids (the embedding gather inside the graph), "ids + host blocks" where it also copies host-tier
    KV blocks (a side stream of per-layer copies that other steps need not carry), else "embeds".
    logits False: no row ends in the chunk (its last layer stops at the KV append)."""
    rows: int
    length: int
    lora: bool
    few_keys: bool
    source: str
    logits: bool

    @classmethod
    def of(cls, rows: int, tokens: int, lora: bool, max_keys: int | None, from_ids: bool = False,
           host_blocks: bool = False, logits: bool = True) -> "PrefillKey":
        """The key of a chunk of `rows` x `tokens` whose rows see at most max_keys keys (None: unknown)."""
        source = ("ids + host blocks" if host_blocks else "ids") if from_ids else "embeds"
        return cls(rows, prefill_bucket(tokens), lora, max_keys is not None and max_keys <= PREFILL_SPLIT_MIN_KEYS,
                   source, logits)


@dataclasses.dataclass(frozen=True)
class MixedKey:
    """A mixed step (engine/mixed_steps.py): the decode batch of `size` rows (padded) and a prompt
    chunk of `rows` x `length` tokens (length: prefill_bucket). (Its attention always splits by the
    cache's capacity: no few-keys variant, half the graphs to capture up front.)"""
    size: int
    rows: int
    length: int
    lora: bool
    processing: bool = False  # (DecodeKey's)
    logprobs: bool = False


class DecodeBuffers:
    """The device tensors one decode step of `size` rows reads and writes."""

    def __init__(self, size: int, scratch_slot: int, device: torch.device, lora_slots: int = 0):
        self.size = size
        self.scratch_slot = scratch_slot
        self.live_rows = 0  # rows 0 .. live_rows-1 are real; the rest are padding
        self.tokens = torch.zeros(size, dtype=torch.int64, device=device)
        self.slots = torch.full((size,), scratch_slot, dtype=torch.int32, device=device)
        self.slot_index = self.slots.long()
        self.temperature = torch.zeros(size, dtype=torch.float32, device=device)
        self.top_k = torch.ones(size, dtype=torch.int32, device=device)
        self.top_p = torch.ones(size, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(size, dtype=torch.int64, device=device)
        self.offsets = torch.zeros(size, dtype=torch.int64, device=device)
        self.q_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.lora = torch.full((size,), -1, dtype=torch.int32, device=device)  # LoRA slot per row, -1: none
        self.lora_used = torch.zeros(1 + lora_slots, dtype=torch.int32, device=device)  # kernels/lora.py used_slots
        self.lora_host: list[int] = []  # the live rows' LoRA slots, known on the host
        self.slots_host: list[int] | None = []  # their cache slots, where the host knows them (None: not)
        self.logits: torch.Tensor | None = None  # the last step's [size, vocab] float32 logits
        # The forward half's logits by LoRA on/off (each forward graph's own output, which its sample graph reads).
        self.forward_logits: dict[bool, torch.Tensor] = {}
        self.logprobs = torch.zeros(size, LOGPROB_WIDTH, dtype=torch.float32, device=device)  # (processing steps)

    @property
    def uses_lora(self) -> bool:
        """Some live row has an adapter: the step runs the LoRA kernels (and that graph)."""
        return any_adapter(self.lora_host)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of the per-row state of live rows `index` (to move them into another buffer set)."""
        return dict(tokens=self.tokens[index], slots=self.slots[index], temperature=self.temperature[index],
                    top_k=self.top_k[index], top_p=self.top_p[index], seeds=self.seeds[index],
                    offsets=self.offsets[index], lora=self.lora[index])

    def load(self, *, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora) -> None:
        """Device-to-device copies of n live rows into rows 0..n-1; rows n.. become padding."""
        n = slots.shape[0]
        if n > self.size:
            raise ValueError(f"{n} rows do not fit decode buffers of {self.size}")
        for buffer, value in ((self.tokens, tokens), (self.slots, slots), (self.temperature, temperature),
                              (self.top_k, top_k), (self.top_p, top_p), (self.seeds, seeds), (self.offsets, offsets),
                              (self.lora, lora)):
            buffer[:n].copy_(value.reshape(-1))
        if n < self.size:
            self.slots[n:].fill_(self.scratch_slot)
            self.temperature[n:].zero_()  # greedy: the cheapest sampling path
            self.top_k[n:].fill_(1)
            self.lora[n:].fill_(-1)
        self.slot_index.copy_(self.slots)
        self.live_rows = n


class TreeBuffers:
    """The device tensors a speculative verify step of `size` rows x `nodes` tree nodes adds to its
    DecodeBuffers (engine/verify.py). The host writes every row's tree in one copy, as one int64
    row [tokens | parents | n_nodes] (`packed`, kernels/tree_step.py reads it inside the step; node
    0 of each row is the row's last token, which the step takes from DecodeBuffers.tokens). The step
    writes each row's new tokens and, last, how many drafts it accepted (`result`), read back in one
    copy too. Rows beyond the live ones are a bare root."""

    def __init__(self, size: int, nodes: int, device: torch.device):
        self.nodes = nodes
        self.packed = torch.zeros(size, 2 * nodes + 1, dtype=torch.int64, device=device)
        self.packed[:, nodes:2 * nodes] = -1
        self.packed[:, 2 * nodes] = 1
        self.result = torch.zeros(size, nodes + 1, dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None  # the last step's [size, nodes, vocab] float32 logits


PREFILL_BUCKET = 128  # prefill graphs exist for chunk lengths 128, 256, ... (padding at most 127 tokens)
# ... and, below that, for these: a short prompt's prefill reads every weight once whatever its length,
# but its padding rows still cost (a 16-token prompt padded to 128 ran the GEMMs of 128 rows).
SHORT_PREFILL_BUCKETS = (16, 32, 64)


def prefill_bucket(tokens: int) -> int:
    """The chunk length a prefill of `tokens` tokens is padded to (its graph's key)."""
    for bucket in SHORT_PREFILL_BUCKETS:
        if tokens <= bucket:
            return bucket
    return -(-tokens // PREFILL_BUCKET) * PREFILL_BUCKET


class PrefillStorage:
    """The memory behind every prefill graph's input embeddings and output logits: one flat tensor
    each, sized for the largest chunk (`rows` x `length` tokens). Each graph's buffers are views of
    their first elements. Graphs replay one at a time and each loads its inputs just before, so they
    can share; the static memory then stays that of the largest chunk instead of growing with every
    (rows, length) shape met, which the up-front memory check (memory.py) relies on."""

    def __init__(self, rows: int, length: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.vocab = hidden, vocab
        self.embeds = torch.zeros(rows * length * hidden, dtype=dtype, device=device)
        self.logits = torch.zeros(rows * vocab, dtype=torch.float32, device=device)


class PrefillBuffers:
    """Static inputs and outputs of one prefill chunk of `rows` x `length` tokens (right-padded)."""

    def __init__(self, rows: int, length: int, storage: PrefillStorage, scratch_slot: int,
                 device: torch.device, lora_slots: int = 0, positions: bool = False, block_rooms=()):
        self.embeds = storage.embeds[:rows * length * storage.hidden].view(rows, length, storage.hidden)
        self.logits = storage.logits[:rows * storage.vocab].view(rows, storage.vocab)  # written by the graph
        # The per-row integers in one tensor, so that one copy loads them all (load's `ints`), followed
        # for the graphs that start from ids by the chunk's token ids and a block table per attached
        # block pool of up to block_rooms entries each (kernels/kv_blocks.py: a KV hit's saved blocks)
        # (their `inputs`, one copy).
        count = PrefillBuffers.int_count(rows, lora_slots)
        self.rows = rows
        tables = [1 + 3 * room for room in block_rooms]
        self.inputs = torch.zeros(count + rows * length + sum(tables), dtype=torch.int32, device=device)
        self.ints, self.ids = self.inputs[:count], self.inputs[count:count + rows * length].view(rows, length)
        self.blocks = self.inputs[count + rows * length:].split(tables)
        self.slots, self.starts, self.q_lens, self.lora = self.ints[:4 * rows].view(4, rows).unbind(0)
        self.lora_used = self.ints[4 * rows:]
        self.scratch_slot = scratch_slot
        self.reset()
        # Multimodal RoPE engines: each token's (t, h, w) rotary position.
        self.positions = torch.zeros(rows, length, 3, dtype=torch.int32, device=device) if positions else None

    def reset(self) -> None:
        """Every row on the scratch slot with one token, no adapter, no block to copy (the state graphs
        are captured in: no request's cache is touched)."""
        self.inputs.zero_()
        self.slots.fill_(self.scratch_slot)
        self.q_lens.fill_(1)
        self.lora.fill_(-1)

    @staticmethod
    def int_count(rows: int, lora_slots: int) -> int:
        """Length of `ints`: slots, starts, q_lens and LoRA slots per row, then the LoRA used-slot list."""
        return 4 * rows + 1 + lora_slots

    def load(self, embeds: torch.Tensor, ints: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """embeds [rows, width <= length, hidden]; ints [int_count] int32 on the device, laid out as `ints`."""
        width = embeds.shape[1]
        self.embeds[:, :width].copy_(embeds)
        if width < self.embeds.shape[1]:
            self.embeds[:, width:].zero_()
        self.ints.copy_(ints)
        self.load_positions(positions)

    def load_positions(self, positions: torch.Tensor | None) -> None:
        """Multimodal RoPE engines: the chunk's [rows, width, 3] positions, zeros after them."""
        if self.positions is not None:
            width = positions.shape[1]
            self.positions[:, :width].copy_(positions)
            self.positions[:, width:].zero_()


class MixedBuffers:
    """The static inputs and outputs of a mixed step's prompt chunk, `rows` x `length` tokens: per row
    its first token's sampling settings (seed, temperature, top_p, top_k), cache slot, start, token
    count and LoRA slot, then the step's LoRA used-slot list (decode rows' and chunk rows' adapters)
    and the chunk's token ids, all in one int32 tensor that the host loads with one copy (seeds are
    pairs of int32, the floats their bits). `first`: each row's sampled first token; `tokens`: the decode
    rows' next tokens followed by `first`, read back in one copy."""

    def __init__(self, rows: int, length: int, decode_size: int, scratch_slot: int, device: torch.device,
                 lora_slots: int = 0):
        self.rows, self.length = rows, length
        count = MixedBuffers.int_count(rows, lora_slots)
        self.inputs = torch.zeros(count + rows * length, dtype=torch.int32, device=device)
        self.seeds = self.inputs[:2 * rows].view(torch.int64)
        self.temperature, self.top_p = self.inputs[2 * rows:4 * rows].view(torch.float32).view(2, rows).unbind(0)
        self.top_k, self.slots, self.starts, self.q_lens, self.lora = self.inputs[4 * rows:9 * rows].view(5, rows).unbind(0)
        self.lora_used = self.inputs[9 * rows:count]
        self.ids = self.inputs[count:].view(rows, length)
        self.first_offsets = torch.zeros(rows, dtype=torch.int64, device=device)  # a first token's RNG offset: 0
        self.tokens = torch.zeros(decode_size + rows, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(decode_size + rows, LOGPROB_WIDTH, dtype=torch.float32, device=device)  # (as tokens)
        self.scratch_slot = scratch_slot
        self.reset()

    @staticmethod
    def int_count(rows: int, lora_slots: int) -> int:
        """The integers before the token ids: 9 per row (a seed is two), then the LoRA used-slot list."""
        return 9 * rows + 1 + lora_slots

    def reset(self) -> None:
        """Every row on the scratch slot with one greedy token and no adapter (the state graphs are
        captured in: no request's cache is touched)."""
        self.inputs.zero_()
        self.slots.fill_(self.scratch_slot)
        self.q_lens.fill_(1)
        self.top_k.fill_(1)
        self.lora.fill_(-1)


class StepGraphs:
    """CUDA graphs of decode steps and prefill chunks, looked up by key; all share one memory pool."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = bool(enabled) and device.type == "cuda"
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None
        # One warm-up stream for every capture: each new stream would get (and keep for the process's
        # life) its own 32 MiB cuBLAS workspace, 32 MiB per captured graph (measured on the H100).
        self._side: torch.cuda.Stream | None = None
        self.capture_seconds = 0.0  # host time spent capturing (a step waits that long for a missing graph)

    def get(self, key: Hashable):
        return self.graphs.get(key) if self.enabled else None

    def capture(self, key: Hashable, step: Callable[[], None], warmup: int = 2) -> torch.cuda.CUDAGraph:
        """Run `step` eagerly `warmup` times on a side stream, then capture one call of it.

        The capture restricts only this thread ("thread_local"): other threads may use CUDA meanwhile
        (the KV store's disk writer waits on events; callers' own threads run their own work), which
        the default "global" mode would turn into a failed capture."""
        began = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            step()
        self.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - began
        return graph


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes that get graphs: powers of two below max_batch, and max_batch."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]
