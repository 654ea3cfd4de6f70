"""Prefill steps of one engine: prefill_step (input embeddings, the seeds' API) and prefill_tokens
(token ids: the runtime's text path, its embedding gather inside the graph), chunked, each chunk
replayed from a CUDA graph per PrefillKey with every integer of the step in one host-to-device copy;
a KV hit's saved blocks copied inside that graph (attach_block_pools): the device tier's before the
first layer, the host tier's layer by layer on a side stream, each layer's attention waiting for its own.
PrefillSteps receives the engine's state, adapters and graph registry; it owns the prefill buffers,
the block pools it was given and the host-copy stream."""

from __future__ import annotations

from array import array

import torch

from ..errors import ConfigurationError, InvalidRequestError
from ..kernels import ops
from ..kernels.attention import PREFILL_SPLIT_MIN_KEYS
from ..kernels.kv_blocks import block_table
from ..kernels.lora import used_slot_list
from .adapters import Adapters, any_adapter
from .graphs import PrefillBuffers, PrefillKey, PrefillStorage, StepGraphs, prefill_bucket
from .state import EngineState


# Programs per (layer, K/V, head) of a host-tier block copy are chosen so that the copy has about this
# many in all: enough reads in flight to keep PCIe busy, few enough to leave the SMs to the layers it
# runs beside (measured on the H100: a 1984-token prefix's 66 MB beside 16 layers' GEMMs of 48 tokens
# cost 1.41 ms with 64 programs a layer, 1.85 with 128, 2.06 with 256; the layers alone 1.11).
HOST_COPY_PROGRAMS = 64


class PrefillSteps:
    def __init__(self, state: EngineState, adapters: Adapters, graphs: StepGraphs, chunk_size: int):
        self.state, self.adapters, self.graphs, self.chunk_size = state, adapters, graphs, chunk_size
        self.buffers: dict[tuple[int, int], PrefillBuffers] = {}  # by (rows, length bucket)
        self.storage: PrefillStorage | None = None
        # The KV store's pools of saved blocks (attach_block_pools), and the stream that copies host blocks
        self.block_pool: torch.Tensor | None = None
        self.host_block_pool: torch.Tensor | None = None
        self._host_copy_stream = None

    def attach_block_pools(self, device: torch.Tensor | None = None, host: torch.Tensor | None = None) -> None:
        """The KV store's pools of saved blocks ([places, layers, 2, kv_heads, tokens, head_dim],
        engine/kv_pool.py): `device` on the engine's device, `host` in pinned host memory (on a CUDA
        engine). prefill_tokens then copies a KV hit's blocks into their slots inside its own step
        (pool_blocks, host_blocks). Prefill graphs captured before are dropped: they lack those copies."""
        data = self.state.kv_cache.data
        layers, two, _, heads, _, head_dim = data.shape
        for name, pool, where in (("device", device, data.device), ("host", host, torch.device("cpu"))):
            if pool is None:
                continue
            if pool.dim() != 6 or tuple(pool.shape[1:4]) != (layers, two, heads) or pool.shape[5] != head_dim \
                    or pool.dtype != data.dtype or pool.device != where:
                raise ConfigurationError(f"{name} block pool {tuple(pool.shape)} {pool.dtype} on {pool.device} does "
                                         f"not hold blocks of this engine's KV cache {tuple(data.shape)} {data.dtype}")
            if name == "host" and data.is_cuda and not pool.is_pinned():
                raise ConfigurationError("the host block pool must be pinned memory: the prefill step reads it")
        self.block_pool, self.host_block_pool = device, host
        self.buffers.clear()
        for key in [k for k in self.graphs.graphs if isinstance(k, PrefillKey)]:
            del self.graphs.graphs[key]

    def _block_room(self, rows: int, pool: torch.Tensor | None) -> int:
        """Entries of a block table of `pool` that a prefill of `rows` rows carries: every whole block
        of each row's longest prompt (0 without the pool)."""
        if pool is None:
            return 0
        return rows * (self.state.config.max_supported_input_length // pool.shape[4])

    def _check_blocks(self, entries: list, pool: torch.Tensor | None, name: str, rows: int) -> None:
        if not entries:
            return
        if pool is None:
            raise InvalidRequestError(f"{name} needs a block pool (attach_block_pools)")
        places, room = pool.shape[0], self._block_room(rows, pool)
        if len(entries) > room or any(not (0 <= p < places and 0 <= b and 0 <= s < self.state.config.max_supported_batch_size)
                                      for p, b, s in entries):
            raise InvalidRequestError(f"{name}: at most {room} (place, position, slot) entries, places in [0, {places})")

    def _host_block_copies(self, table: torch.Tensor):
        """Queues the host pool's blocks of `table` into their slots on a side stream, one layer after
        the other (kernels/kv_blocks.py reads the pinned pool across PCIe), and returns
        (before_attention(layer): the current stream waits for that layer's copy; join(): it waits for
        all). Captured in a prefill graph, the copies run beside the layers before them."""
        main = torch.cuda.current_stream(self.state.device)
        if self._host_copy_stream is None:
            self._host_copy_stream = torch.cuda.Stream(self.state.device)
        side = self._host_copy_stream
        side.wait_stream(main)
        data = self.state.kv_cache.data
        split = max(1, HOST_COPY_PROGRAMS // (data.shape[1] * data.shape[3]))
        done = []
        with torch.cuda.stream(side):
            for layer in range(data.shape[0]):
                ops.blocks_to_slot(self.host_block_pool, data, table, layer=layer, split=split)
                done.append(torch.cuda.Event())
                done[-1].record(side)
        return (lambda layer: main.wait_event(done[layer])), (lambda: main.wait_stream(side))

    def prefill_step(self, inputs_embeds: torch.Tensor, context_lengths, slots=None, lora=None,
                     cached_lengths=None, positions=None, position_offsets=None, *,
                     long_rope: bool = False) -> torch.Tensor:
        """Start new sequences: fills the given slots' (default 0..B-1) KV cache with the prompt and
        returns the last prompt token's logits, [B, vocab] float32.

        inputs_embeds: [B, S, hidden], right-padded; context_lengths: [B] (list or tensor);
        lora: one adapter name per row ("" = none), or None for the active adapter on every row.
        cached_lengths: [B] positions of each slot that already hold the prompt's first tokens (a
        reused prefix, e.g. copied in by the KV store; default 0). inputs_embeds then holds only the
        rest of each prompt, context_lengths - cached_lengths tokens, which is prefilled after them.
        positions / position_offsets (multimodal RoPE engines only): [B, S, 3] (t, h, w) rotary positions
        of inputs_embeds' tokens, and [B] how far each row's later positions run behind its cache
        positions (kernels/rope_append.py); default: text, t = h = w = the cache position, offset 0.
        long_rope (LongRoPE engines): rotate every token with the long factors, as for a prompt past the
        original context (the runner's prepare_decode_rows); the max_input_length limit does not apply then.
        """
        batch, seq, hidden = inputs_embeds.shape
        if hidden != self.state.config.hidden_size:
            raise InvalidRequestError(f"inputs_embeds must be [B, S, {self.state.config.hidden_size}]")
        return self._prefill(inputs_embeds.to(self.state.dtype), None, batch, seq, _int_list(context_lengths), slots,
                             lora, cached_lengths, positions, position_offsets, long_rope)

    def prefill_tokens(self, prompts: list[list[int]], slots=None, lora=None, cached_lengths=None, *,
                       pool_blocks=(), host_blocks=(), long_rope: bool = False) -> torch.Tensor:
        """prefill_step for text prompts given as token ids (whole prompts; with cached_lengths, the
        tokens after each row's cached prefix are prefilled). The embedding gather runs inside the
        prefill graph and the ids travel with the step's other integers in one copy: a short prompt's
        TTFT is otherwise a good part host work before the GPU starts.
        pool_blocks / host_blocks: (place, position, slot) entries (kernels/kv_blocks.py) of the attached
        device / host block pool to copy into the slots: a cached prefix that the KV store left to
        this step (the host pool's are copied layer by layer beside the prefill's earlier layers)."""
        batch = len(prompts)
        pool_blocks, host_blocks = list(pool_blocks), list(host_blocks)
        self._check_blocks(pool_blocks, self.block_pool, "pool_blocks", batch)
        self._check_blocks(host_blocks, self.host_block_pool, "host_blocks", batch)
        lengths = [len(p) for p in prompts]
        cached = [0] * batch if cached_lengths is None else _int_list(cached_lengths)
        if len(cached) != batch:
            raise InvalidRequestError("cached_lengths must have one entry per prompt")
        new = _id_arrays([p[c:] for p, c in zip(prompts, cached)], self.state.weights.embed.shape[0])
        return self._prefill(None, new, batch, max(map(len, new), default=0), lengths, slots, lora, cached,
                             None, None, long_rope, (pool_blocks, host_blocks))

    def _prefill(self, embeds, tokens, batch: int, seq: int, lengths: list[int], slots, lora, cached_lengths,
                 positions, position_offsets, long_rope: bool, blocks=((), ())) -> torch.Tensor:
        """prefill_step / prefill_tokens: `embeds` [B, S, hidden] in the engine dtype, or `tokens` (each
        row's new token ids, S the longest) and `blocks` (pool_blocks, host_blocks)."""
        cfg = self.state.config
        # The per-row checks and arithmetic on Python ints: each op on a small CPU tensor costs a few
        # microseconds, and a short prompt's whole prefill on the GPU takes about a millisecond.
        if long_rope and self.state.longrope_original is None:
            raise InvalidRequestError("long_rope is for LongRoPE models only")
        limit = cfg.max_kv_cache_capacity if long_rope else cfg.max_supported_input_length
        cached, new = prefill_rows(cfg, batch, seq, lengths, cached_lengths, limit)
        slot_ids = list(range(batch)) if slots is None else self.state.slots(slots, batch, on_device=False).tolist()
        lora_rows = self.adapters.rows(lora, batch)
        uses_lora = any_adapter(lora_rows)
        positions, offsets = self._prompt_positions(positions, position_offsets, batch, seq)
        original = self.state.longrope_original
        if original is not None:  # prompts past the original context: the all-long half
            offsets = [cfg.max_kv_cache_capacity if (n > original or long_rope) else 0 for n in lengths]
        chunk = self.chunk_size
        begins = list(range(0, max(new), chunk))
        # Every integer of the step in one host-to-device copy (each copy from pageable memory costs
        # ~10-20 us of host time): per row its slot, cached length, final length, RoPE offset; per
        # chunk whether the row's last token is in it; then per chunk the graph buffers' `ints`
        # (slots, starts, token counts, LoRA slots, the LoRA used-slot list) and, given token ids,
        # the chunk's ids right-padded to its graph's length and a block table per attached pool (the
        # first chunk's copy the blocks), loaded with one copy.
        # (An int32 array: the token ids are copied in as memory, not converted int by int, which for
        # a 4096-token prompt took ~0.3 ms of host time before the GPU started.)
        used = used_slot_list(lora_rows, self.adapters.capacity)
        packed = array("i", slot_ids + cached + lengths + offsets)
        ends = [[int(begin < n <= begin + chunk) for n in new] for begin in begins]  # rows whose last token is in it
        for flags in ends:
            packed.extend(flags)
        chunk_ints = []
        for begin in begins:
            chunk_ints.append(len(packed))
            packed.extend(slot_ids + [c + begin for c in cached] + [min(max(n - begin, 0), chunk) for n in new]
                          + lora_rows + used)
            if tokens is not None:
                width = prefill_bucket(min(chunk, seq - begin))
                for row in tokens:
                    part = row[begin:begin + width]
                    packed.extend(part)
                    packed.extend(_zeros(width - len(part)))
                for pool, entries in zip((self.block_pool, self.host_block_pool), blocks):
                    if pool is not None:  # padded to the table's room: the tables lie one after the other
                        entries = entries if begin == 0 else ()
                        packed.extend(block_table(entries))
                        packed.extend(_zeros(3 * (self._block_room(batch, pool) - len(entries))))
        device_ints = torch.frombuffer(packed, dtype=torch.int32)
        if self.state.device.type == "cuda":
            device_ints = device_ints.pin_memory().to(self.state.device, non_blocking=True)
        per_row = device_ints[:(4 + len(begins)) * batch].view(-1, batch)
        slot_dev, cached_dev, lengths_dev = per_row[0], per_row[1], per_row[2]
        if self.state.rope.offsets is not None:
            self.state.rope.offsets[slot_dev.long()] = per_row[3]
        if self.state.rope.sections is not None:
            if positions is None:  # text: t = h = w = the cache position
                steps = torch.arange(seq, dtype=torch.int32, device=self.state.device)
                positions = (cached_dev[:, None] + steps)[..., None].expand(batch, seq, 3)
            else:
                positions = positions.to(self.state.device, torch.int32)
        logits = None
        for i, begin in enumerate(begins):
            # Row b contributes its new tokens [begin, begin + chunk) (none once it has ended), placed
            # after its cached prefix; its logits come from the chunk that holds its last token.
            width = min(chunk, seq - begin)
            end = chunk_ints[i + 1] if i + 1 < len(begins) else len(packed)
            inputs = device_ints[chunk_ints[i]:end]
            part_embeds = None if tokens is not None else embeds[:, begin:begin + chunk]
            max_keys = max(c + begin + min(max(n - begin, 0), chunk) for c, n in zip(cached, new))
            part = self._prefill_chunk(part_embeds, inputs, uses_lora, batch, width,
                                       None if positions is None else positions[:, begin:begin + chunk], max_keys,
                                       host_blocks=bool(blocks[1]) and begin == 0,
                                       logits=any(ends[i]))  # (no row ends here: the cache is all it leaves)
            if part is not None:
                logits = part if logits is None else torch.where(per_row[4 + i].bool()[:, None], part, logits)
        self.state.kv_cache.lengths[slot_dev.long()] = lengths_dev
        return logits

    def _prompt_positions(self, positions, offsets, batch: int, seq: int):
        """prefill_step's positions (checked, or None) and per-row offsets (a list, zeros by default)."""
        if self.state.rope.sections is None:
            if positions is not None or offsets is not None:
                raise InvalidRequestError("positions / position_offsets are for multimodal-RoPE models only")
            return None, [0] * batch
        if positions is not None:
            positions = torch.as_tensor(positions)
            if positions.shape != (batch, seq, 3):
                raise InvalidRequestError(f"positions must be [{batch}, {seq}, 3] (t, h, w per token)")
            if positions.device.type == "cpu" and positions.numel() and \
                    (positions.min() < 0 or positions.max() >= self.state.config.max_kv_cache_capacity):
                raise InvalidRequestError(f"positions must be in [0, {self.state.config.max_kv_cache_capacity})")
        offsets = torch.zeros(batch, dtype=torch.int64) if offsets is None else \
            torch.as_tensor(offsets, dtype=torch.int64).cpu()
        if offsets.shape != (batch,):
            raise InvalidRequestError(f"position_offsets must have {batch} entries")
        return positions, offsets.tolist()

    def _prefill_chunk(self, embeds, inputs, uses_lora: bool, rows: int, width: int, positions=None,
                       max_keys: int | None = None, host_blocks: bool = False, logits: bool = True) -> torch.Tensor | None:
        """One prefill chunk of `rows` x `width` tokens: `embeds` [rows, width, hidden], with `inputs`
        PrefillBuffers.ints' layout on the device; or embeds None and `inputs` the ints followed by the
        chunk's token ids ([rows, bucket], PrefillBuffers.inputs), embedded inside the step. Replayed
        from a graph of its PrefillKey where graphs are on. max_keys: the most keys a row sees after the chunk; a chunk whose rows see few (a short
        prompt, nothing cached) takes attention without split-K (kernels/attention.py
        PREFILL_SPLIT_MIN_KEYS), so each bucket has a graph for those and one for the rest (split by
        the cache's capacity; eager runs the same). host_blocks: the chunk's table of host-tier blocks
        is not empty (graphs that copy them are kept apart: the other steps skip the copy stream).
        logits=False: no row ends in this chunk; it only fills the cache (returns None)."""
        from_ids = embeds is None
        key = PrefillKey.of(rows, width, uses_lora, max_keys, from_ids, host_blocks, logits)
        span = PREFILL_SPLIT_MIN_KEYS if key.few_keys else None
        buf = self._buffers(rows, key.length)
        graph = self.graphs.get(key)
        if graph is None and self.graphs.enabled:
            # Warm-up and capture with every row on the scratch slot: no request's cache is touched.
            buf.reset()
            graph = self.graphs.capture(key, lambda: self._prefill_body(buf, uses_lora, span, from_ids, host_blocks,
                                                                        logits))
        if from_ids:
            buf.inputs[:inputs.numel()].copy_(inputs)
            buf.load_positions(positions)
        else:
            buf.load(embeds, inputs, positions)
        if graph is not None:
            graph.replay()
        else:  # eager: the chunk's own width, no padding computed
            self._prefill_body(buf, uses_lora, span, from_ids, host_blocks, logits, width)
        return buf.logits.clone() if logits else None  # the next prefill overwrites buf.logits

    def _buffers(self, rows: int, length: int) -> PrefillBuffers:
        buf = self.buffers.get((rows, length))
        if buf is None:
            if self.storage is None:
                cfg = self.state.config
                widest = prefill_bucket(min(self.chunk_size, cfg.max_supported_input_length))
                self.storage = PrefillStorage(cfg.max_supported_batch_size, widest, cfg.hidden_size,
                                              self.state.weights.lm_head.shape[0], self.state.dtype, self.state.device)
            buf = PrefillBuffers(rows, length, self.storage, self.state.kv_cache.scratch_slot, self.state.device,
                                 self.adapters.capacity, positions=self.state.rope.sections is not None,
                                 block_rooms=[self._block_room(rows, pool)
                                              for pool in (self.block_pool, self.host_block_pool) if pool is not None])
            self.buffers[rows, length] = buf
        return buf

    def _prefill_body(self, buf: PrefillBuffers, uses_lora: bool, max_keys: int | None, from_ids: bool,
                      host_blocks: bool, logits: bool = True, width: int | None = None) -> None:
        """One chunk on `buf`, device work only (what a graph captures); width: the tokens of each row
        computed (None: the buffers' whole length, as a graph must)."""
        tables = list(buf.blocks)
        data = self.state.kv_cache.data
        before_attention = join = None
        if from_ids and self.block_pool is not None:  # a KV hit's device blocks into their slots (count 0: none)
            ops.blocks_to_slot(self.block_pool, data, tables.pop(0))
        if from_ids and host_blocks:  # its host blocks, beside the layers before theirs (on CUDA)
            if data.is_cuda:
                before_attention, join = self._host_block_copies(tables.pop(0))
            else:
                ops.blocks_to_slot(self.host_block_pool, data, tables.pop(0))
        embeds = self.state.embed(buf.ids[:, :width]) if from_ids else buf.embeds[:, :width]
        positions = None if buf.positions is None else buf.positions[:, :width]
        out = self.state.forward(embeds, buf.slots, buf.starts, buf.q_lens,
                                 lora=self.adapters.batch(buf.lora, buf.lora_used, uses_lora), positions=positions,
                                 max_keys=max_keys, before_attention=before_attention, logits=logits)
        if out is not None:
            buf.logits.copy_(out)
        if join is not None:
            join()


def prefill_rows(cfg, batch: int, seq: int, lengths: list[int], cached_lengths, limit: int):
    """A prefill's rows checked (InvalidRequestError): B rows within max_batch_size, context lengths
    in [1, limit], cached lengths that leave each row 1 to `seq` new tokens. Returns (cached, new):
    per row its cached length and the tokens it prefills now."""
    cached = [0] * batch if cached_lengths is None else _int_list(cached_lengths)
    if batch > cfg.max_supported_batch_size:
        raise InvalidRequestError(f"batch of {batch} exceeds max_batch_size {cfg.max_supported_batch_size}")
    if batch < 1 or len(lengths) != batch or len(cached) != batch:
        raise InvalidRequestError("a prefill needs B >= 1 rows with B context lengths (and B cached lengths)")
    if min(lengths) < 1 or max(lengths) > limit:
        raise InvalidRequestError(f"context lengths must be in [1, {limit}]")
    new = [n - c for n, c in zip(lengths, cached)]
    if min(cached) < 0 or min(new) < 1 or max(new) > seq:
        raise InvalidRequestError(f"cached lengths must leave each row 1 to {seq} (inputs_embeds' length) "
                                  "tokens to prefill")
    return cached, new


def _int_list(values) -> list[int]:
    """A list, tuple or tensor of integers as a list of Python ints."""
    return values.tolist() if isinstance(values, torch.Tensor) else [int(v) for v in values]


def _id_arrays(rows, vocab: int) -> list[array]:
    """Each row's token ids as an int32 array (its memory is what the step copies), checked to lie in
    [0, vocab): converting a list to an array takes a fifth of torch.tensor's time, and the range
    check of all rows is then one min/max on their memory."""
    try:
        arrays = [array("i", row) for row in rows]
    except (OverflowError, TypeError) as exc:
        raise InvalidRequestError(f"token ids must be ints in [0, {vocab})") from exc
    flat = array("i")
    for row in arrays:
        flat.extend(row)
    if len(flat) > 512:  # (a torch op costs ~10 us: for a short prompt min / max are cheaper)
        low, high = (int(v) for v in torch.aminmax(torch.frombuffer(flat, dtype=torch.int32)))
    else:
        low, high = (min(flat), max(flat)) if flat else (0, 0)
    if low < 0 or high >= vocab:
        raise InvalidRequestError(f"token ids must be in [0, {vocab})")
    return arrays


def _zeros(count: int) -> array:
    return array("i", bytes(4 * count))
