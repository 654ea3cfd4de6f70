"""Running the app under uvicorn: bind first (GET /health answers "loading" while the model loads on a
thread of its own), print the URL once the runtime is ready, and on Ctrl-C / SIGTERM stop taking new
requests ("draining"), let the ones in flight finish for up to `drain_seconds`, then exit."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from typing import Callable

import uvicorn

from .app import ServerSettings, ServerState, create_app

log = logging.getLogger("edgellm.server")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        if self._state.phase in ("ready", "loading"):
            self._state.phase = "draining"
            print(f"edgellm serve: draining {self._state.in_flight} request(s) in flight "
                  f"(up to {self.config.timeout_graceful_shutdown} s), then exiting", flush=True)
        super().handle_exit(sig, frame)
        # uvicorn raises the signals it caught again once it has shut down, so the process would end by
        # SIGTERM; a drained server exits 0 instead (a second Ctrl-C still forces the exit).
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def server(load: Callable[[], object], settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000,
           drain_seconds: float = 30.0, log_level: str = "warning") -> tuple[uvicorn.Server, ServerState]:
    """A uvicorn Server for the app (not started) and its state; `load()` builds the runtime when the
    server starts (serve()) or is called by the caller, who then calls state.ready(runtime)."""
    state = ServerState(settings)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_seconds, access_log=log_level in ("info", "debug"))
    return _DrainingServer(config, state), state


def serve(load: Callable[[], object], settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000,
          drain_seconds: float = 30.0, log_level: str = "warning", switch_interval_ms: float | None = None) -> int:
    """Serve until Ctrl-C / SIGTERM; returns the exit status (0 after a drain, 1 if the model failed to load).
    switch_interval_ms: the process's GIL switch interval (the engine loop and the event loop share it)."""
    uv, state = server(load, settings, host=host, port=port, drain_seconds=drain_seconds, log_level=log_level)
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1e3)

    def loading() -> None:
        try:
            runtime = load()
        except BaseException as exc:  # noqa: BLE001 (reported, and the server stops)
            state.phase, state.error = "failed", str(exc) or type(exc).__name__
            print(f"edgellm serve: the model failed to load: {state.error}", flush=True)
            uv.should_exit = True
            return
        if state.phase == "draining":
            return
        # What loading made (modules, weights' Python objects) moves out of the collector's reach: a full
        # collection over it holds the interpreter ~100 ms, a stall in every stream (and the engine loop).
        gc.collect()
        gc.freeze()
        state.ready(runtime)
        shown = f"[{host}]" if ":" in host else host
        print(f"edgellm serve: {state.settings.model_name} ready at http://{shown}:{port}/v1 "
              "(OpenAI and Anthropic APIs; Ctrl-C stops)", flush=True)

    threading.Thread(target=loading, name="edgellm-serve-load", daemon=True).start()
    uv.run()
    return 1 if state.phase == "failed" else 0
