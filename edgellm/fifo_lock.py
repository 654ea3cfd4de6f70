"""FifoLock: a re-entrant lock that hands itself to waiting threads in the order they arrived.

The runtime holds one around everything that touches its engine (engine work is stateful: the KV
cache slots, the running decode batch, the static buffers of the CUDA graphs), so concurrent callers
take turns, first come first served. `threading.RLock` gives no such order: a thread that releases
and at once asks again can starve the others.

Re-entrant because a streaming callback, run while its request holds the lock, may call back into
the runtime (to list adapters, say); the runtime decides which nested calls make sense (`owned`).
A waiter that gives up (timeout, KeyboardInterrupt) leaves the queue, so nobody waits on it.
"""

from __future__ import annotations

import collections
import threading


class FifoLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[object] = collections.deque()  # one token per waiting thread
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for this thread's turn (at most `timeout` seconds; None: as long as it takes)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            token = object()
            self._queue.append(token)
            try:
                turn = self._cond.wait_for(lambda: self._owner is None and self._queue[0] is token, timeout)
            except BaseException:  # interrupted while waiting: leave the queue, wake the next in line
                self._queue.remove(token)
                self._cond.notify_all()
                raise
            if not turn:
                self._queue.remove(token)
                self._cond.notify_all()
                return False
            self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FifoLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "FifoLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    @property
    def waiting(self) -> int:
        """Threads queued for the lock."""
        with self._cond:
            return len(self._queue)
