"""Saved KV prefixes in three tiers: device memory, pinned host RAM, a disk directory.

A prompt's KV is saved in fixed blocks of `block_tokens` tokens. Block i's key hashes block i-1's
key with the block's token ids; block 0 starts from a root that hashes the model identity, the
dtype, the LoRA adapter (name and content) and the block size. So equal keys mean an equal
prefix, and the longest saved prefix of any prompt (a system prompt, earlier turns of a chat) is
found by walking its keys until the first miss.

Tiers (each optional, `KVReuseSettings`): "gpu" (the engine's device; byte budget), "host" (pinned
RAM; byte budget, allocated up front) and "disk" (kv_disk.py; persistent, shared across processes).
Within a memory tier eviction is least-recently-used, and an evicted block moves down to the next
enabled tier instead of being dropped. A hit in a lower tier promotes the block to the top enabled
one (a host hit when the prompt is saved, from the slot it was copied into; a disk hit at once). New
blocks go to the top memory tier and are written through to disk, so another process finds them.
Device -> host copies run on a side CUDA stream; host -> device copies are reads of the pinned host
tier by the block-copy kernel (kernels/kv_blocks.py), no staging buffer between.

The runner's linear KV cache layout never changes: `restore` copies the saved blocks into a
slot's first positions and the caller prefills only the rest (DESIGN.md). With defer=True the memory
tiers' blocks are left to the caller (take_pending), whose prefill step copies them inside its own
CUDA graph (runner.attach_block_pools): a device hit then pays no copy launch of its own before its
first token, and a host hit's PCIe reads run layer by layer beside the prefill's earlier layers
instead of before them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import deque
from pathlib import Path

import torch

from ..errors import ConfigurationError
from ..kernels import ops
from ..kernels.kv_blocks import block_table
from .kv_cache import LinearKVCache
from .kv_disk import DiskTier
from .kv_pool import BlockPool

DEFAULT_BLOCK_TOKENS = 64
RECENT_PROMPTS = 4  # prompts whose block keys keys() remembers


@dataclasses.dataclass(frozen=True)
class KVReuseSettings:
    """Which tiers of saved KV prefixes a runtime keeps. A budget of 0 (or no directory) turns
    that tier off. gpu_bytes: device memory for saved blocks (beside the KV cache); host_bytes:
    pinned host RAM; disk_dir: a directory kept across processes and runs; block_tokens: tokens
    per saved block (a prefix is reused in whole blocks)."""

    gpu_bytes: int = 256 << 20
    host_bytes: int = 0
    disk_dir: str | Path | None = None
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def check(self) -> None:
        for name in ("gpu_bytes", "host_bytes", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"KVReuseSettings.{name} must be a non-negative integer, got {value!r}")
        if self.block_tokens < 1:
            raise ConfigurationError("KVReuseSettings.block_tokens must be at least 1")
        if not (self.gpu_bytes or self.host_bytes or self.disk_dir):
            raise ConfigurationError("KVReuseSettings enables no tier: give gpu_bytes, host_bytes or disk_dir")


@dataclasses.dataclass
class KVReuseStats:
    """KV reuse of one response, or cumulated over a runtime's life (blocks, except where said)."""

    lookups: int = 0            # prompts looked up
    blocks_looked_up: int = 0   # whole blocks those prompts could have reused
    hits_gpu: int = 0
    hits_host: int = 0
    hits_disk: int = 0
    reused_tokens: int = 0      # prompt tokens not prefilled
    stored_blocks: int = 0      # new blocks saved
    prefill_ms_saved: float = 0.0  # estimate: reused tokens x a measured prefill time per token (runtime.py)
    restore_ms: float = 0.0     # host time spent finding and copying in saved blocks
    save_ms: float = 0.0        # host time spent saving new blocks (disk writes run in the background)

    @property
    def reused_blocks(self) -> int:
        return self.hits_gpu + self.hits_host + self.hits_disk

    @property
    def hit_rate(self) -> float:
        return self.reused_blocks / self.blocks_looked_up if self.blocks_looked_up else 0.0

    def add(self, other: "KVReuseStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reused_blocks": self.reused_blocks, "hit_rate": self.hit_rate}

    def log_line(self) -> str:
        saved = f"~{self.prefill_ms_saved:.1f} ms" if self.prefill_ms_saved or not self.reused_tokens else \
            "not measured yet (no prefill rate in this process)"
        return (f"KV reuse: reused blocks {self.reused_blocks} of {self.blocks_looked_up} (gpu {self.hits_gpu}, "
                f"host {self.hits_host}, disk {self.hits_disk}), cache hit rate {self.hit_rate:.2f}, reused tokens "
                f"{self.reused_tokens}, new blocks {self.stored_blocks}, prefill saved {saved}")


def model_identity(model_dir: Path, quantization: str | None = None) -> str:
    """A digest that names a model's weights across processes: config.json, and each safetensors
    file's size and first and last MiB (reading whole multi-GB files would cost seconds), and the
    quantization applied at load (its keys differ from the full-precision model's)."""
    digest = hashlib.sha256()
    if quantization:
        digest.update(f"quantization:{quantization}".encode())
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for file in sorted(model_dir.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()


class TieredKVStore:
    def __init__(self, cache: LinearKVCache, settings: KVReuseSettings, identity: str):
        settings.check()
        self.cache = cache
        self.settings = settings
        self.block_tokens = settings.block_tokens
        layers, _, _, kv_heads, _, head_dim = cache.data.shape
        self.layout = [layers, 2, kv_heads, self.block_tokens, head_dim]
        self.device = cache.data.device
        self.identity = identity
        self._cuda = self.device.type == "cuda"
        dtype = cache.data.dtype
        gpu = BlockPool(settings.gpu_bytes, self.layout, dtype, self.device) if settings.gpu_bytes else None
        host = BlockPool(settings.host_bytes, self.layout, dtype, torch.device("cpu"), pinned=self._cuda) \
            if settings.host_bytes else None
        self.gpu = gpu if gpu is not None and gpu.capacity else None  # a budget below one block: no tier
        self.host = host if host is not None and host.capacity else None
        self.disk = DiskTier(settings.disk_dir, {"model": identity, "dtype": str(dtype),
                                                 "layout": self.layout}) if settings.disk_dir else None
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        # restore(defer=True)'s blocks not copied yet: (place, position, slot) of the gpu and host tiers
        self._pending: list[tuple[int, int, int]] = []
        self._pending_host: list[tuple[int, int, int]] = []
        self._host_ready: dict[int, object] = {}  # host place -> the event of the side-stream copy writing it
        self._host_written = None  # the latest such event the compute stream has not waited for yet
        self._roots: dict[str, bytes] = {}  # root(): block 0's parent key per adapter fingerprint
        # keys(): (adapter fingerprint, whole-block tokens, their keys) of the last few prompts hashed
        self._recent: deque[tuple[str, list[int], list[bytes]]] = deque(maxlen=RECENT_PROMPTS)

    def pools(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gpu and host tiers' block buffers (None for a tier that is off), for
        runner.attach_block_pools."""
        return tuple(tier.data if tier is not None else None for tier in (self.gpu, self.host))

    # ---- keys
    def root(self, adapter: str) -> bytes:
        """Block 0's parent key for this engine and LoRA adapter fingerprint ("" = the base model);
        remembered per fingerprint (every request asks, and the JSON and hash cost ~10-20 us)."""
        root = self._roots.get(adapter)
        if root is None:
            text = json.dumps({"model": self.identity, "dtype": str(self.cache.data.dtype), "adapter": adapter,
                               "block_tokens": self.block_tokens, "layout": self.layout}, sort_keys=True)
            root = self._roots[adapter] = hashlib.sha256(text.encode()).digest()
        return root

    def keys(self, tokens: list[int], adapter: str) -> list[bytes]:
        """The keys of the whole blocks of `tokens`: a hash chain, so key i names tokens[:(i+1)*T]
        (each block's tokens as little-endian int64s after its parent's key). The tokens are packed
        in one struct.pack call: per block array() conversions took half of a 2048-token prompt's
        ~80 us of hashing, time that a KV hit spends before its prefill can start. The chains of the
        last RECENT_PROMPTS prompts are remembered, and a prompt that starts with one of them (a
        chat's earlier turns, a shared system prompt) hashes only the blocks after that prefix:
        comparing 2000 tokens costs a few microseconds, hashing them 50-140."""
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        size = self.block_tokens
        whole = len(tokens) // size * size
        keys = self._known_keys(tokens, whole, adapter)
        key = keys[-1] if keys else self.root(adapter)
        done = len(keys) * size
        packed = memoryview(struct.pack(f"<{whole - done}q", *tokens[done:whole]))
        for start in range(0, 8 * (whole - done), 8 * size):
            chained = hashlib.sha256(key)
            chained.update(packed[start:start + 8 * size])
            key = chained.digest()[:20]
            keys.append(key)
        if len(keys) > done // size:  # (a prompt known whole is a prefix of a remembered one)
            self._recent.appendleft((adapter, tokens[:whole], keys))
        return list(keys)

    def _known_keys(self, tokens: list[int], whole: int, adapter: str) -> list[bytes]:
        """The keys of the longest run of whole blocks that `tokens` shares with a remembered prompt
        (a new list), found by comparing tokens; [] if none."""
        size, best = self.block_tokens, []
        for known_adapter, known, chain in self._recent:
            if known_adapter != adapter or len(chain) <= len(best):
                continue
            n = min(len(known), whole)
            if known[:size] != tokens[:size]:
                continue
            if known[:n] == tokens[:n]:
                shared = n // size
            else:  # the longest equal run of whole blocks, by bisection
                low, high = 0, n // size
                while low < high:
                    mid = (low + high + 1) // 2
                    if known[:mid * size] == tokens[:mid * size]:
                        low = mid
                    else:
                        high = mid - 1
                shared = low
            if shared > len(best):
                best = chain[:shared]
        return best

    # ---- moving blocks
    def _slot_view(self, slot: int, block_index: int, blocks: int = 1) -> torch.Tensor:
        """Blocks [block_index, block_index + blocks) of cache slot `slot`: [layers, 2, kv_heads, tokens, head_dim]."""
        start = block_index * self.block_tokens
        return self.cache.data[:, :, slot, :, start:start + blocks * self.block_tokens, :]

    def _side_copy(self, host: torch.Tensor, block: torch.Tensor):
        """Copies a device block nothing else writes into pinned `host` on the side stream, after the
        work queued so far; returns the copy's event (None without CUDA: copied at once)."""
        if not self._cuda:
            host.copy_(block)
            return None
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            host.copy_(block, non_blocking=True)
            block.record_stream(self._side)
            ready = torch.cuda.Event()
            ready.record(self._side)
        return ready

    def _to_host(self, block: torch.Tensor):
        """(host copy, ready event) of a device block nothing else writes, for the disk tier's writer."""
        host = torch.empty(block.shape, dtype=block.dtype, pin_memory=self._cuda)
        return host, self._side_copy(host, block)

    def _table(self, entries: list) -> torch.Tensor:
        """A block table (kernels/kv_blocks.py) of (place, position, slot) entries on the device, in one
        copy from pinned memory."""
        return torch.tensor(block_table(entries), dtype=torch.int32, pin_memory=self._cuda).to(
            self.device, non_blocking=True)

    def take_pending(self) -> tuple[list, list]:
        """The blocks that restore(defer=True) left to copy, as (place, position, slot) entries of the
        gpu tier and of the host tier: the caller's prefill step copies them into their slots before
        its attention (runner.prefill_tokens' pool_blocks and host_blocks)."""
        pending, self._pending = self._pending, []
        pending_host, self._pending_host = self._pending_host, []
        return pending, pending_host

    def flush_pending(self) -> None:
        """Copy the deferred blocks now (before a place of either pool is reused, or for a caller that
        cannot)."""
        self.copy_blocks(*self.take_pending())

    def copy_blocks(self, pending: list, pending_host: list) -> None:
        """Copy take_pending's entries into their slots now (a caller whose prefill step cannot take them)."""
        if pending:
            ops.blocks_to_slot(self.gpu.data, self.cache.data, self._table(pending))
        if pending_host:
            ops.blocks_to_slot(self.host.data, self.cache.data, self._table(pending_host))

    def _place(self, key: bytes) -> int:
        """A place in the device pool for a new block; the block evicted from it moves down a tier."""
        self.flush_pending()  # a deferred copy may still have to read the place given out here
        index, evicted = self.gpu.allocate(key)
        if evicted is not None:  # a copy: the place is overwritten next, while the side stream reads
            self._demote_from_gpu(evicted[0], self.gpu.data[evicted[1]].clone())
        return index

    def _put_gpu(self, key: bytes, block: torch.Tensor) -> None:
        self.gpu.data[self._place(key)].copy_(block)

    def _to_host_from_pool(self, index: int):
        host, ready = self._to_host(self.gpu.data[index])
        self.gpu.reading(index, ready)
        return host, ready

    def _demote_from_gpu(self, key: bytes, block: torch.Tensor) -> None:
        if self.host is not None:
            self._put_host(key, block)
        elif self.disk is not None and not self.disk.has(key):
            self.disk.write(key, *self._to_host(block))

    def _put_host(self, key: bytes, block: torch.Tensor) -> None:
        """A block on the engine's device that nothing else writes into a host-tier place (most
        recently used), on the side stream after the work queued so far: after every queued read of
        that place by a prefill. The block evicted from the place moves down to disk."""
        self.flush_pending()  # a deferred copy may still have to read the place given out here
        index, evicted = self.host.allocate(key)
        if evicted is not None and self.disk is not None and not self.disk.has(evicted[0]):
            ready = self._host_ready.get(evicted[1])
            if ready is not None:
                ready.synchronize()  # written long ago, as the least recently used block
            self.disk.write(evicted[0], self.host.data[evicted[1]].clone(), None)
        ready = self._side_copy(self.host.data[index], block)
        if ready is not None:
            self._host_ready[index] = self._host_written = ready

    def _from_disk(self, key: bytes, host: torch.Tensor) -> torch.Tensor:
        """A block read from disk, on the device and promoted to the top memory tier. It is read into
        pageable memory and copied from there: pinning fresh buffers costs more than it saves (on the
        H100 the first disk hits of a process took 85-150 ms instead of 23 with pinned reads)."""
        block = host.to(self.device) if self._cuda else host.clone()
        if self.gpu is not None:
            self._put_gpu(key, block)
        elif self.host is not None:
            self._put_host(key, block)
        return block

    # ---- what the runtime calls
    def restore(self, slot: int, length: int, keys: list[bytes], stats: KVReuseStats, defer: bool = False) -> int:
        """Copies the longest saved prefix of a prompt of `length` tokens whose block keys are `keys`
        (self.keys: the caller hashes the prompt once for restore and save) into cache slot `slot`
        (whole blocks, leaving at least one token to prefill, whose logits the caller needs); returns
        its length in tokens. defer: leave the memory tiers' blocks to the caller (take_pending).
        Host hits stay in the host tier until `save`, which promotes them from the slot."""
        usable = (length - 1) // self.block_tokens
        stats.lookups += 1
        stats.blocks_looked_up += usable
        keys = keys[:usable]
        gpu_entries, host_entries = [], []
        for position, key in enumerate(keys):  # the memory tiers first
            place = self.gpu.get(key) if self.gpu is not None else None
            if place is not None:
                gpu_entries.append((place, position, slot))
                continue
            place = self.host.get(key) if self.host is not None else None
            if place is None:
                break
            host_entries.append((place, position, slot))
        reused = len(gpu_entries) + len(host_entries)
        stats.hits_gpu += len(gpu_entries)
        stats.hits_host += len(host_entries)
        if host_entries and self._host_written is not None:  # no read of a host place before its copy is done
            torch.cuda.current_stream(self.device).wait_event(self._host_written)
            self._host_written = None
        # Blocks go straight from either pool into the slot, one pass per pool (kernels/kv_blocks.py),
        # before any disk hit below can evict a place.
        self._pending += gpu_entries
        self._pending_host += host_entries
        if not defer:
            self.flush_pending()
        if self.disk is not None and reused < len(keys):  # then the run of blocks that follows on disk
            for key, host in zip(keys[reused:], self.disk.read_prefix(keys[reused:])):
                self._slot_view(slot, reused).copy_(self._from_disk(key, host))
                stats.hits_disk += 1
                reused += 1
        stats.reused_tokens += reused * self.block_tokens
        return reused * self.block_tokens

    def save(self, slot: int, keys: list[bytes], stats: KVReuseStats) -> None:
        """Saves the whole blocks of a prompt whose KV cache slot `slot` holds, named by their keys
        (self.keys), that are not saved yet, and promotes its host-tier blocks to the gpu tier."""
        new, promoted = [], []
        for index, key in enumerate(keys):
            if self.gpu is not None and self.gpu.get(key) is not None:  # now the most recently used
                continue
            if self.host is not None and self.host.get(key) is not None:
                if self.gpu is not None:
                    promoted.append(index)
                continue
            if self.disk is None or not self.disk.has(key):
                new.append(index)
        stats.stored_blocks += len(new)
        moved = new + promoted
        if not moved:
            return
        if self.gpu is not None and len(moved) <= self.gpu.capacity:
            # One pass from the slot into the pool. The new places evict none of each other: they are
            # the most recently used and fit. A promoted block's host place is free from now on: any
            # later copy into it queues after this prompt's prefill, which read it.
            for index in promoted:
                self.host.take(keys[index])
            places = [self._place(keys[i]) for i in moved]
            ops.blocks_from_slot(self.gpu.data, self.cache.data,
                                 self._table([(place, i, slot) for place, i in zip(places, moved)]))
            if self.disk is not None:
                for index, place in zip(new, places):
                    self.disk.write(keys[index], *self._to_host_from_pool(place))
            return
        for index in new:
            # A copy of the slot's block first (on the compute stream): the slot may be overwritten by
            # the next request while the side stream still copies to the host.
            key, block = keys[index], self._slot_view(slot, index).clone()
            if self.gpu is not None:  # a pool smaller than this prompt's blocks: one at a time, the new only
                self._put_gpu(key, block)
            elif self.host is not None:
                self._put_host(key, block)
            if self.disk is not None:
                self.disk.write(key, *self._to_host(block))

    def flush(self) -> None:
        """Wait for pending disk writes (at exit, or before another process needs the files)."""
        if self.disk is not None:
            self.disk.flush()
