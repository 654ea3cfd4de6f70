"""How the runner's work runs: torch inference mode at its public methods (engine/runner.py's module
docstring says why), and the kernels' per-thread settings carried from one thread to another."""

from __future__ import annotations

import functools

import torch

from ..kernels.dispatch import RunSettings, run_settings, run_with


def inference_call(method):
    """Run a public runner method in inference mode whatever the caller's; a caller outside
    inference mode gets returned tensors (alone or in a tuple) as ordinary copies, which it may modify."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            out = method(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in out)
        return out.clone() if isinstance(out, torch.Tensor) else out
    return call


def outside_inference_mode(method):
    """Build persistent state as ordinary tensors even when the caller is in inference mode."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)
    return call


def caller_kernel_settings() -> RunSettings:
    """The calling thread's kernel settings (kernels/dispatch.py: use_reference() and the like hold per
    thread), for a thread that runs the engine on its behalf (serving/engine_loop.py)."""
    return run_settings()


def kernel_settings(settings: RunSettings):
    """A block whose kernels run under `settings` (caller_kernel_settings of another thread)."""
    return run_with(**settings._asdict())
