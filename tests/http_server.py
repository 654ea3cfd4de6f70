"""A real uvicorn server of edgellm.server on 127.0.0.1 (a free port), in a thread of the test process,
for the HTTP tests: running_server(runtime, settings) yields its base URL and state. Its event loop's
thread and worker threads (where requests are submitted) run the ops' torch references, as
reference_ops tests do."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time

from edgellm.kernels.dispatch import use_reference

try:  # the HTTP client the openai and anthropic packages bring (httpx2 in their newer releases)
    import httpx2 as httpx  # noqa: F401 (the tests import it from here)
except ImportError:
    import httpx  # noqa: F401


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_HELD = []  # the executor threads' use_reference() blocks, entered for good (a collected one would exit)


def _reference_thread() -> None:
    block = use_reference()
    block.__enter__()
    _HELD.append(block)


@contextlib.contextmanager
def running_server(runtime, settings=None, *, drain_seconds: float = 5.0):
    from edgellm.server import ServerSettings, server

    port = free_port()
    uv, state = server(lambda: runtime, settings or ServerSettings(), host="127.0.0.1", port=port,
                       drain_seconds=drain_seconds)
    if runtime is not None:
        state.ready(runtime)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(8, initializer=_reference_thread))
    def run() -> None:
        with use_reference():
            loop.run_until_complete(uv.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        uv.should_exit = True
        thread.join(30)
        loop.close()
