"""Decode steps of one engine. The fast path: the running batch's rows in static buffers (graphs.py
DecodeBuffers), sampling inside the step, one CUDA graph per DecodeKey (padded batch size, LoRA on/off).
start_decode sets the rows; decode_sample_step advances them all by one token; add_decode_rows lets rows
join (sequences admitted while others decode), keep_decode_rows drops finished rows; restart_decode_rows
points the same rows elsewhere. decode_step is the seeds' eager
embeddings-in, logits-out step. DecodeSteps receives the engine's state, adapters, graph registry and
verify steps (whose graphs it captures with each batch size's); it owns the decode buffers."""

from __future__ import annotations

import contextlib

import torch

from ..errors import InvalidRequestError
from ..kernels.lora import used_slot_list
from ..progress import progress
from .adapters import Adapters, any_adapter
from .devices import to_device
from .graphs import DecodeBuffers, DecodeKey, StepGraphs, graph_batch_sizes
from .logit_processing import LOGPROB_WIDTH
from .state import EngineState
from .verify import TreeSteps


class DecodeSteps:
    def __init__(self, state: EngineState, adapters: Adapters, graphs: StepGraphs, verify: TreeSteps):
        self.state, self.adapters, self.graphs, self.verify = state, adapters, graphs, verify
        self.buffers: dict[int, DecodeBuffers] = {}  # by padded batch size
        self.active: DecodeBuffers | None = None  # the running batch's
        self._host_tokens: list[torch.Tensor] | None = None  # decode_launch's pinned pair, used in turn
        self._host_logprobs: list[torch.Tensor] | None = None  # (and their logprobs')
        self._host_turn = 0
        self._halves: bool | None = None  # between decode_launch_forward and _sample: the step's LoRA on/off

    def decode_step(self, inputs_embeds: torch.Tensor, slots=None, lora=None) -> torch.Tensor:
        """Append one token per row: inputs_embeds [b, 1, hidden] for cache slots `slots` (default
        0..b-1), adapters `lora` as in prefill_step. Returns the new logits, [b, vocab] float32."""
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds[:, None]
        batch = inputs_embeds.shape[0]
        state = self.state
        slot_ids = state.slots(slots, batch)
        lora_batch = self.adapters.batch_of(self.adapters.rows(lora, batch))
        starts = state.kv_cache.lengths[slot_ids.long()]
        q_lens = torch.ones(batch, dtype=torch.int32, device=state.device)
        logits = state.forward(inputs_embeds.to(state.dtype), slot_ids, starts, q_lens, lora=lora_batch,
                               decode_step=True)
        state.kv_cache.lengths[slot_ids.long()] = starts + 1
        return logits

    def running(self, caller: str) -> DecodeBuffers:
        """The running batch's buffers (RuntimeError naming `caller` before start_decode)."""
        if self.active is None:
            raise RuntimeError(f"{caller} before start_decode")
        return self.active

    def holds_adapter(self, slot: int) -> bool:
        return self.active is not None and slot in self.active.lora_host[:self.active.live_rows]

    def _padded_size(self, rows: int) -> int:
        if not self.graphs.enabled:
            return rows
        return next(size for size in graph_batch_sizes(self.state.config.max_supported_batch_size) if size >= rows)

    def _buffers(self, size: int) -> DecodeBuffers:
        if size not in self.buffers:
            self.buffers[size] = DecodeBuffers(size, self.state.kv_cache.scratch_slot, self.state.device,
                                               self.adapters.capacity)
        return self.buffers[size]

    def step_body(self, buf: DecodeBuffers, uses_lora: bool, processing: bool = False, logprobs: bool = False) -> None:
        """One decode step on `buf`, device work only: what a graph captures (processing: with the
        rows' logit processing, engine/logit_processing.py; logprobs: writing buf.logprobs)."""
        self.sample_body(buf, self.forward_body(buf, uses_lora), processing, logprobs)

    def forward_body(self, buf: DecodeBuffers, uses_lora: bool) -> torch.Tensor:
        """A decode step's first half: the rows' tokens through the model, their KV appended; the logits."""
        state = self.state
        lengths = state.kv_cache.lengths
        scratch = state.kv_cache.scratch_slot
        lengths[scratch:scratch + 1].zero_()  # padding rows restart at position 0 every step (no host scalar:
        # a CPU value copied in would be illegal while a graph is captured)
        starts = lengths[buf.slot_index]
        embeds = torch.nn.functional.embedding(buf.tokens, state.weights.embed)[:, None]
        logits = state.forward(embeds, buf.slots, starts, buf.q_lens,
                               lora=self.adapters.batch(buf.lora, buf.lora_used, uses_lora), decode_step=True)
        lengths[buf.slot_index] = starts + 1
        return logits

    def sample_body(self, buf: DecodeBuffers, logits: torch.Tensor, processing: bool, logprobs: bool) -> None:
        """A decode step's second half: the rows' next tokens drawn from `logits` into buf.tokens."""
        buf.offsets += 1
        buf.tokens.copy_(self.state.sample(logits, buf.temperature, buf.top_k, buf.top_p, buf.seeds, buf.offsets,
                                           slots=buf.slots if processing else None, count=True,
                                           logprobs=buf.logprobs if logprobs else None))
        buf.logits = logits

    def capture_decode_graphs(self, batch_sizes=None, lora: bool = False) -> list[int]:
        """Capture decode graphs up front for these batch sizes (default: every padded size up to
        max_batch_size); sizes are rounded up to the padded sizes. lora=True captures the graphs of
        batches that use adapters (any mix; the base-model graphs are separate). Returns the sizes."""
        if not self.graphs.enabled:
            return []
        most = self.state.config.max_supported_batch_size
        wanted = graph_batch_sizes(most) if batch_sizes is None else batch_sizes
        sizes = []
        for rows in progress(wanted, desc="capturing decode graphs", unit="graph"):
            if not 1 <= int(rows) <= most:
                raise InvalidRequestError(f"batch size {rows} is outside 1..{most}")
            size = self._padded_size(int(rows))
            self._ensure_graph(size, bool(lora) and self.adapters.stacks is not None)
            sizes.append(size)
        return sorted(set(sizes))

    def _ensure_graph(self, size: int, uses_lora: bool, processing: bool = False, logprobs: bool = False,
                      part: str = "step") -> None:
        key = DecodeKey(size, uses_lora, processing, logprobs, part)
        if not self.graphs.enabled or self.graphs.get(key) is not None:
            return
        buf = self._buffers(size)
        if part == "forward":
            def body():
                buf.forward_logits[uses_lora] = self.forward_body(buf, uses_lora)
        elif part == "sample":  # (reads its forward graph's output: that graph first)
            self._ensure_graph(size, uses_lora, part="forward")
            def body():
                self.sample_body(buf, buf.forward_logits[uses_lora], processing, logprobs)
        else:
            def body():
                self.step_body(buf, uses_lora, processing, logprobs)
        if buf is self.active:  # (processing turned on under a running batch: its rows wait meanwhile)
            with self.rows_set_aside(buf):
                self.graphs.capture(key, body)
            return
        empty = torch.empty(0, dtype=torch.int64, device=self.state.device)
        buf.load(tokens=empty, slots=empty, temperature=empty, top_k=empty, top_p=empty, seeds=empty, offsets=empty,
                 lora=empty)
        buf.lora_used.zero_()
        # Warm-up and capture touch only the scratch slot: every row of `buf` is padding here.
        self.graphs.capture(key, body)
        # (verify steps take no rows that process their logits: the engine loop's rule)
        if part == "step" and not (processing or logprobs):
            self.verify.capture_graphs(buf, uses_lora)

    def start_decode(self, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora=None) -> None:
        """Set the rows of the next decode steps. Per row (all [n], device tensors or lists): the last
        token (input of the next step), its KV-cache slot, sampling temperature / top_k / top_p, seed,
        and the RNG offset used last (each step advances it by one before drawing). lora: one
        adapter name per row ("" = none), or None for the active adapter on every row."""
        rows = decode_rows(self.state.device, self.state.config.max_supported_batch_size, tokens, slots, temperature,
                           top_k, top_p, seeds, offsets)
        lora_rows = self.adapters.rows(lora, rows["slots"].shape[0])
        rows["lora"] = to_device(lora_rows, torch.int32, self.state.device)
        self._load_rows(rows, lora_rows, host_slots(slots))

    def add_decode_rows(self, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora=None) -> None:
        """Rows joining the running decode batch, after its live rows (start_decode's arguments, for the
        new rows; start_decode itself where no batch runs). The rows already running go on as they were;
        the batch moves to the smallest padded size that holds them all. A slot that is already running,
        or more rows than max_batch_size in all, is an InvalidRequestError."""
        if self.active is None:
            return self.start_decode(tokens, slots, temperature, top_k, top_p, seeds, offsets, lora)
        buf, state = self.active, self.state
        new = decode_rows(state.device, state.config.max_supported_batch_size, tokens, slots, temperature, top_k,
                          top_p, seeds, offsets)
        new_lora = self.adapters.rows(lora, new["slots"].shape[0])
        new["lora"] = to_device(new_lora, torch.int32, state.device)
        known, added = buf.slots_host, host_slots(slots)
        slots_host = None if known is None or added is None else known[:buf.live_rows] + added
        rows = joined_rows(buf.rows(torch.arange(buf.live_rows, device=state.device)), new,
                           state.config.max_supported_batch_size, slots_host)
        self._load_rows(rows, buf.lora_host[:buf.live_rows] + new_lora, slots_host)

    def restart_decode_rows(self, tokens, lengths=None) -> None:
        """Point the running decode batch's rows (start_decode's: same slots and settings) at new
        input tokens ([n], a list or a device tensor) and, if given, set their slots' cache lengths
        ([n]; e.g. a draft model rewinding to the text it has read). Cheaper than a new start_decode."""
        buf = self.running("restart_decode_rows")
        live = buf.live_rows
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.shape != (live,) or (lengths is not None and len(lengths) != live):
            raise InvalidRequestError(f"restart_decode_rows: {live} tokens (and lengths)")
        buf.tokens[:live].copy_(tokens)
        if lengths is not None:
            lengths = torch.tensor(lengths, dtype=torch.int32).to(self.state.device)
            self.state.kv_cache.lengths[buf.slot_index[:live]] = lengths

    def keep_decode_rows(self, keep) -> None:
        """Continue decoding only rows `keep` (indices into the current rows, in order): finished
        rows leave the batch, which moves to the smallest padded size that holds the rest."""
        buf = self.running("keep_decode_rows")
        keep = list(keep)
        if any(not 0 <= i < buf.live_rows for i in keep):
            raise InvalidRequestError(f"keep_decode_rows: indices must be in [0, {buf.live_rows})")
        lora_rows = [buf.lora_host[i] for i in keep]
        known = buf.slots_host
        self._load_rows(buf.rows(to_device(keep, torch.int64, self.state.device)), lora_rows,
                        None if known is None else [known[i] for i in keep])

    def _load_rows(self, rows: dict, lora_rows: list[int], slots: list[int] | None) -> None:
        size = self._padded_size(rows["slots"].shape[0])
        self.active = None
        self._ensure_graph(size, any_adapter(lora_rows), self.state.processing_active, self.state.logprobs_active)
        buf = self._buffers(size)
        buf.load(**rows)
        buf.lora_used.copy_(to_device(used_slot_list(lora_rows, self.adapters.capacity), torch.int32,
                                      self.state.device))
        buf.lora_host, buf.slots_host = lora_rows, slots
        self.active = buf

    @contextlib.contextmanager
    def rows_set_aside(self, buf: DecodeBuffers):
        """While the block runs, `buf` holds only padding rows (a graph that reads these buffers is
        being captured: its warm-up must not advance a live row); its live rows are put back after."""
        live, device = buf.live_rows, self.state.device
        saved = buf.rows(torch.arange(live, device=device))
        lora_used, lora_host, slots_host = buf.lora_used.clone(), buf.lora_host, buf.slots_host
        empty = torch.empty(0, dtype=torch.int64, device=device)
        buf.load(**{name: empty for name in saved})
        buf.lora_used.zero_()
        try:
            yield
        finally:
            buf.load(**saved)
            buf.lora_used.copy_(lora_used)
            buf.lora_host, buf.slots_host = lora_host, slots_host

    def end_decode(self) -> None:
        """The decode batch is done: its rows stop holding their adapters (see remove_lora_weights)."""
        self.active = None

    def decode_sample_step(self) -> torch.Tensor:
        """One decode step of the rows set by start_decode: returns their sampled tokens, [n] int64 on
        the device (a view of the static buffer, overwritten by the next step)."""
        buf = self.running("decode_sample_step")
        key = DecodeKey(buf.size, buf.uses_lora, self.state.processing_active, self.state.logprobs_active)
        if not self._replay(key):
            self.step_body(buf, buf.uses_lora, key.processing, key.logprobs)
        return buf.tokens[:buf.live_rows]

    def _replay(self, key: DecodeKey) -> bool:
        """Replays the graph of `key` (captured now if missing: processing turned on under this batch);
        False where graphs are off (the caller runs the step's body)."""
        if not self.graphs.enabled:
            return False
        graph = self.graphs.get(key)
        if graph is None:
            self._ensure_graph(key.size, key.lora, key.processing, key.logprobs, key.part)
            graph = self.graphs.get(key)
        graph.replay()
        return True

    def decode_launch(self) -> "PendingTokens":
        """decode_sample_step without waiting for it: queues the step and a copy of its tokens to
        pinned host memory, and returns at once. The caller may queue the next step (which reads
        these tokens on the device) before reading these with .wait(): the host's work on step n
        then overlaps the GPU's on step n + 1. At most two may be pending at a time."""
        tokens = self.decode_sample_step()
        wrote = self.state.logprobs_active  # (the step just launched wrote logprobs)
        return self.pending(tokens, self.active.logprobs[:tokens.shape[0]] if wrote else None)

    def decode_launch_forward(self) -> None:
        """A decode step's first half queued (the rows' forward, to the logits): the host may read the
        previous step's tokens and set the next draw's token masks while the device runs it; then
        decode_launch_sample queues the draw. Same rows, same result as decode_launch."""
        buf = self.running("decode_launch_forward")
        self._halves = buf.uses_lora
        if not self._replay(DecodeKey(buf.size, self._halves, part="forward")):
            buf.forward_logits[self._halves] = self.forward_body(buf, self._halves)

    def decode_launch_sample(self) -> "PendingTokens":
        """The second half of the step decode_launch_forward began: the draw, and its tokens' copy to the host."""
        buf = self.running("decode_launch_sample")
        if self._halves is None:
            raise RuntimeError("decode_launch_sample without decode_launch_forward")
        uses_lora, self._halves = self._halves, None
        processing, logprobs = self.state.processing_active, self.state.logprobs_active
        if not self._replay(DecodeKey(buf.size, uses_lora, processing, logprobs, "sample")):
            self.sample_body(buf, buf.forward_logits[uses_lora], processing, logprobs)
        tokens = buf.tokens[:buf.live_rows]
        return self.pending(tokens, buf.logprobs[:tokens.shape[0]] if logprobs else None)

    def pending(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> "PendingTokens":
        """A launched step's tokens (a device tensor of at most twice max_batch_size: engine/mixed_steps.py
        adds its chunk rows' first tokens), and its rows' logprobs where it wrote them ([rows,
        LOGPROB_WIDTH]), copied to pinned host memory behind the step: its PendingTokens."""
        if self.state.device.type != "cuda":
            return PendingTokens(tokens.clone(), None, None if logprobs is None else logprobs.clone())
        if self._host_tokens is None:
            most = 2 * self.state.config.max_supported_batch_size
            self._host_tokens = [torch.empty(most, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._host_logprobs = [torch.empty(most, LOGPROB_WIDTH, dtype=torch.float32, pin_memory=True)
                                   for _ in range(2)]
        host = self._host_tokens[self._host_turn][:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = self._host_logprobs[self._host_turn][:logprobs.shape[0]]
            host_logprobs.copy_(logprobs, non_blocking=True)
        self._host_turn ^= 1
        done = torch.cuda.Event()
        done.record()
        return PendingTokens(host, done, host_logprobs)

    def decode_logits(self) -> torch.Tensor:
        """The last decode_sample_step's logits of the live rows, [n, vocab] float32."""
        buf = self.active
        if buf is None or buf.logits is None:
            raise RuntimeError("no decode step has run")
        return buf.logits[:buf.live_rows]


def decode_rows(device, most: int, tokens, slots, temperature, top_k, top_p, seeds, offsets) -> dict:
    """start_decode's per-row arguments as device tensors by name, checked: 1..most rows, one entry each."""
    as_t = lambda x, dtype: to_device(x, dtype, device)  # noqa: E731
    rows = dict(tokens=as_t(tokens, torch.int64), slots=as_t(slots, torch.int32),
                temperature=as_t(temperature, torch.float32), top_k=as_t(top_k, torch.int32),
                top_p=as_t(top_p, torch.float32), seeds=as_t(seeds, torch.int64), offsets=as_t(offsets, torch.int64))
    n = rows["slots"].shape[0]
    if not 1 <= n <= most:
        raise InvalidRequestError(f"decode batch of {n} rows is outside 1..{most}")
    if any(v.shape != (n,) for v in rows.values()):
        raise InvalidRequestError("start_decode: every per-row argument must have one entry per row")
    return rows


def joined_rows(running: dict, new: dict, most: int, slots_host: list[int] | None = None) -> dict:
    """The running rows' per-row tensors (by name) followed by the new rows', checked: at most `most`
    rows and no slot twice (a row that joined a slot already running would read and write its cache;
    checked on `slots_host`, the joined rows' slots, where the host knows them, else on the device)."""
    count = running["slots"].shape[0] + new["slots"].shape[0]
    if count > most:
        raise InvalidRequestError(f"add_decode_rows: {running['slots'].shape[0]} running rows + "
                                  f"{new['slots'].shape[0]} new ones exceed max_batch_size {most}")
    rows = {name: torch.cat([running[name], new[name]]) for name in running}
    distinct = len(set(slots_host)) if slots_host is not None else rows["slots"].unique().numel()
    if distinct != count:
        raise InvalidRequestError("add_decode_rows: a new row's slot is already running (or given twice)")
    return rows


def host_slots(slots) -> list[int] | None:
    """Slots given as a list or a host tensor, as ints (None for a device tensor: not read back)."""
    if isinstance(slots, torch.Tensor):
        return slots.tolist() if slots.device.type == "cpu" else None
    return [int(s) for s in slots]


class PendingTokens:
    """A queued decode step's sampled tokens (decode_launch), and its rows' logprobs where it wrote them."""

    def __init__(self, host: torch.Tensor, done, logprobs: torch.Tensor | None = None):
        self._host, self._done, self._logprobs = host, done, logprobs

    def wait(self) -> list[int]:
        """The tokens, once the step and the copy have finished."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()

    def logprobs(self) -> list[list[float]] | None:
        """After wait(): each row's logprobs (engine/logit_processing.py LOGPROB_WIDTH values), or None."""
        return None if self._logprobs is None else self._logprobs.tolist()
