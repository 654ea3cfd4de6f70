"""serving/request_handle.py's hand-over: the engine loop's thread, having woken an asyncio loop (a
stream's first tokens), waits until that loop has begun the wake-up, and not at all for a loop that has
stopped (its scheduled wake-up would never run)."""

import asyncio
import threading
import time

from edgellm.serving import request_handle


def test_the_engine_thread_waits_until_the_loop_has_begun_its_wake_up():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        while not loop.is_running():
            time.sleep(0.001)
        event = asyncio.Event()
        waker = request_handle._waker(loop)
        hold = threading.Event()
        loop.call_soon_threadsafe(hold.wait)  # (the loop busy: the wake-up cannot begin yet)
        waker.wake_up(event)()
        assert not waker._ran.is_set()
        threading.Timer(0.05, hold.set).start()
        began = time.perf_counter()
        waker.wait_begun(5.0)
        assert waker._ran.is_set() and 0.03 < time.perf_counter() - began < 5.0
        request_handle.hand_over()  # (nothing scheduled now: returns at once)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    stopped = request_handle._waker(loop)
    stopped.wake_up(asyncio.Event())()  # scheduled on a loop that no longer runs
    began = time.perf_counter()
    stopped.wait_begun(5.0)
    assert not stopped._ran.is_set() and time.perf_counter() - began < 1.0
    loop.close()
