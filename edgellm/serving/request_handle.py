"""RequestHandle: a submitted request as its caller sees it (LLMInferenceRuntime.submit): its text deltas
queued for the caller's thread (or an asyncio task), its result, done and cancel; and respond(), the
LLMGenerationResponse of a finished handle, built on the engine loop's thread from its sequences."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import weakref
from typing import AsyncIterator, Callable, Iterator

from ..engine.kv_store import KVReuseStats
from ..errors import RequestCancelledError
from ..requests import GenerationTimings, LLMGenerationResponse, token_logprobs
from .sequence import Sequence


@dataclasses.dataclass(frozen=True)
class Delta:
    """A piece of one item's output: its new text, and on the item's last piece its finish reason
    ("stop" or "length") and the stop string that ended it (if one did)."""
    item: int
    text: str
    finish_reason: str | None = None
    stop_sequence: str | None = None
    logprobs: tuple = ()  # with LLMGenerationRequest.logprobs: TokenLogprobs of the tokens since the last Delta


class RequestHandle:
    """A submitted request (LLMInferenceRuntime.submit): stream() / deltas() / adeltas(), result() /
    aresult(), done(), cancel()."""

    def __init__(self, sequences: list[Sequence], wake: Callable[[], None],
                 respond: Callable[["RequestHandle"], object]):
        self.sequences = sequences
        self.submitted = time.perf_counter()
        self.image_preprocess_ms = 0.0  # loading and preprocessing its images, before submit (runtime.py)
        self._wake, self._respond = wake, respond
        self._deltas = _Pieces()  # Deltas, then None once every item is done
        self._notify: Callable[[], None] | None = None  # wakes an adeltas() consumer (from the loop's thread)
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._response = None
        self._left = len(sequences)
        self._logprobs_sent = [0] * len(sequences)
        for item, seq in enumerate(sequences):
            seq.on_text = (lambda item: lambda text: self._put(Delta(item, text, logprobs=self._new_logprobs(item))))(item)

    def stream(self) -> Iterator[tuple[int, str]]:
        """(item index, text delta) pairs as the items generate, until all are done (then the error,
        if the request failed). Texts joined per item equal result()'s output_texts."""
        for delta in self.deltas():
            if delta.text:
                yield delta.item, delta.text

    def deltas(self) -> Iterator[Delta]:
        """stream()'s pieces as Deltas, each item's last one carrying its finish reason (a cancelled
        item has none), until all are done (then the error, if the request failed)."""
        while True:
            piece = self._deltas.get()
            if piece is None:
                break
            yield piece
        if self._error is not None:
            raise self._error

    @property
    def prompt_lengths(self) -> list[int]:
        """Each item's prompt length in tokens (known once submit() returns)."""
        return [seq.row.prompt_len for seq in self.sequences]

    async def adeltas(self) -> AsyncIterator[list[Delta]]:
        """deltas() for asyncio, a list at a time (every Delta queued since the last list): awaits the
        engine loop without holding a thread; a consumer slower than the engine gets fewer, longer lists."""
        ready = asyncio.Event()
        self._notify = _waker(asyncio.get_running_loop()).wake_up(ready)
        try:
            while True:
                ready.clear()  # (before draining: a piece queued after the drain sets it again)
                pieces = self._deltas.take_all()
                ended = bool(pieces) and pieces[-1] is None
                if ended:
                    pieces.pop()
                if pieces:
                    yield pieces
                if ended:
                    if self._error is not None:
                        raise self._error
                    return
                await ready.wait()
        finally:
            self._notify = None

    async def aresult(self):
        """result() for asyncio."""
        async for _ in self.adeltas():
            pass
        return self.result()

    def _new_logprobs(self, item: int) -> tuple:
        """The item's token logprobs not handed out in a Delta yet (on the loop's thread)."""
        seq = self.sequences[item]
        if seq.logprobs is None:
            return ()
        sent, end = self._logprobs_sent[item], min(len(seq.row.ids), len(seq.token_logprobs))
        self._logprobs_sent[item] = max(sent, end)
        return tuple(token_logprobs(seq.row.ids[sent:end], seq.token_logprobs[sent:end], seq.logprobs))

    def _put(self, piece: Delta | None) -> None:
        self._deltas.put(piece)
        notify = self._notify
        if notify is not None:
            notify()

    def ready_pieces(self) -> Iterator[tuple[int, str]]:
        """The (item, text delta) pairs queued so far, without waiting (EngineLoop.run_until)."""
        for piece in self._deltas.take_all():
            if piece is None:
                self._deltas.put(None)  # (stream() still ends on it)
                return
            if piece.text:
                yield piece.item, piece.text

    def result(self, timeout: float | None = None):
        """The LLMGenerationResponse, once every item is done (TimeoutError after `timeout` seconds);
        RequestCancelledError after cancel(); the engine's error if the request failed."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._response

    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop generating: each item's slot is freed at the next step boundary; result() then raises
        RequestCancelledError. No effect once the request is done."""
        if self.done():
            return
        for seq in self.sequences:
            seq.cancelled = True
        self._wake()

    # ---- called by the loop
    def _sequence_done(self, seq: Sequence) -> None:
        if seq.row.finish_reason is not None:
            text = seq.row.live_text
            item = self.sequences.index(seq)
            self._put(Delta(item, "", seq.row.finish_reason, text.stop if text is not None else None,
                            self._new_logprobs(item)))
        self._left -= 1
        if self._left == 0:
            if any(seq.cancelled and seq.row.finish_reason is None for seq in self.sequences):
                self._fail(RequestCancelledError("the request was cancelled"))
                return
            try:
                self._response = self._respond(self)
            except Exception as exc:  # noqa: BLE001 (handed to the caller's thread)
                self._fail(exc)
                return
            self._finished.set()  # (before the end of the stream: result() is ready when a stream ends)
            self._put(None)

    def _fail(self, error: BaseException) -> None:
        if self._finished.is_set():
            return
        self._error = error
        self._finished.set()
        self._put(None)


def respond(handle: RequestHandle):
    """A finished handle's LLMGenerationResponse (on the loop's thread): its items' texts, ids, finish
    reasons and timings (queue: submitted -> first item admitted; prefill: -> the last item's first
    token; decode: -> the last item's finish)."""
    sequences = handle.sequences
    for seq in sequences:
        seq.row.text = seq.row.live_text.text if seq.row.live_text is not None else ""
    admitted = min(seq.admitted for seq in sequences)
    first = max(seq.first_token for seq in sequences)
    finished = max(seq.finished or time.perf_counter() for seq in sequences)
    vision_ms = sum(seq.vision_ms for seq in sequences)
    timings = GenerationTimings(queue_ms=(admitted - handle.submitted) * 1e3,
                                prefill_ms=(first - admitted) * 1e3 - vision_ms, decode_ms=(finished - first) * 1e3,
                                decode_tokens=sum(max(len(seq.row.ids) - 1, 0) for seq in sequences),
                                total_ms=(finished - handle.submitted) * 1e3,
                                image_preprocess_ms=handle.image_preprocess_ms, vision_ms=vision_ms)
    reuse = None
    if sequences[0].reuse is not None:
        reuse = KVReuseStats()
        for seq in sequences:
            reuse.add(seq.reuse)
    spec = sequences[0].spec
    if spec is not None:  # tokens a finished row dropped have no flag
        spec.stats.accepted_flags = [flags[:len(seq.row.ids)] for flags, seq in zip(spec.stats.accepted_flags,
                                                                                     sequences)]
    return LLMGenerationResponse(
        output_texts=[seq.row.text for seq in sequences], output_ids=[seq.row.ids for seq in sequences],
        finish_reasons=[seq.row.finish_reason for seq in sequences],
        prompt_lengths=[seq.row.prompt_len for seq in sequences], timings=timings, kv_reuse=reuse,
        speculative=spec.stats if spec is not None else None,
        stop_sequences=[seq.row.live_text.stop if seq.row.live_text is not None else None for seq in sequences],
        token_times_ms=[[(t - handle.submitted) * 1e3 for t in seq.token_times[:len(seq.row.ids)]]
                        for seq in sequences],
        logprobs=[token_logprobs(seq.row.ids, seq.token_logprobs[:len(seq.row.ids)], seq.logprobs)
                  for seq in sequences] if sequences[0].logprobs is not None else None)


class _Pieces:
    """A handle's queued Deltas: put by the loop's thread, taken one at a time by a waiting thread
    (deltas()) or all at once (adeltas(), ready_pieces()). A deque and a condition, cheaper than
    queue.Queue for the take-all a streaming server does at every step."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._added = threading.Condition(threading.Lock())
        self._waiting = 0

    def put(self, piece) -> None:
        self._items.append(piece)  # (atomic; the lock only orders it with a waiter's check)
        if self._waiting:
            with self._added:
                self._added.notify()

    def get(self):
        """The next piece, waiting for one."""
        with self._added:
            self._waiting += 1
            try:
                while not self._items:
                    self._added.wait()
            finally:
                self._waiting -= 1
            return self._items.popleft()

    def take_all(self) -> list:
        items = self._items
        return [items.popleft() for _ in range(len(items))]


class _LoopWaker:
    """Wake-ups of one asyncio loop's adeltas() consumers from the engine loop's thread, coalesced: the
    handles one engine step feeds cost one call_soon_threadsafe (one wake of the event loop), not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []
        self._ran = threading.Event()  # (clear while a wake-up is scheduled and has not begun)
        self._ran.set()

    def wake_up(self, event: asyncio.Event) -> Callable[[], None]:
        """A notify() for the loop's thread: sets `event` in the asyncio loop soon."""
        def notify() -> None:
            with self._lock:
                self._pending.append(event)
                if len(self._pending) > 1:
                    return  # (a wake-up is already scheduled; it sets this event too)
                self._ran.clear()
            self._loop.call_soon_threadsafe(self._run)
        return notify

    def wait_begun(self, timeout: float) -> None:
        """Until the scheduled wake-up (if any) has begun on the asyncio loop, at most `timeout` s (not at
        all for a loop that no longer runs: its wake-up never will)."""
        if not self._ran.is_set() and self._loop.is_running():
            self._ran.wait(timeout)

    def _run(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
            self._ran.set()
        for event in events:
            event.set()


# How long hand_over() waits for an event loop at most (one busy elsewhere, e.g. parsing a large body).
HAND_OVER_S = 0.5e-3


def hand_over() -> None:
    """Called by the engine loop's thread once it has put first tokens in streams: it waits (the GIL
    released) until each asyncio loop it woke has begun its wake-up, so that loop sends the first chunk
    now rather than after the engine's next launch, which otherwise holds the shared GIL first (H100
    host: part of the server's added time to first token). At most HAND_OVER_S per loop."""
    with _wakers_lock:
        wakers = list(_wakers.values())
    for waker in wakers:
        waker.wait_begun(HAND_OVER_S)


_wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker]" = weakref.WeakKeyDictionary()
_wakers_lock = threading.Lock()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    with _wakers_lock:
        waker = _wakers.get(loop)
        if waker is None:
            waker = _wakers[loop] = _LoopWaker(loop)
        return waker

