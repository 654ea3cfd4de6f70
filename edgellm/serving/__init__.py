"""The serving layer between the runtime and the engine (DESIGN.md, "Serving: one loop owns the engine"):
sequence.py (one generated row), scheduler.py (who waits, who runs, which KV slot each holds),
engine_loop.py (the thread that owns the runner and runs the iterations) and request_handle.py (a
submitted request as its caller sees it, and its response)."""
