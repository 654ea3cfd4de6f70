"""The serving layer between the runtime and the engine (DESIGN.md, "Serving: one loop owns the engine"):
sequence.py (one generated row), scheduler.py (who waits, who runs, which KV slot each holds) and
engine_loop.py (the thread that owns the runner and runs the iterations)."""
