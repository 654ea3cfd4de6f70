"""torch inference mode at the runner's public methods (engine/runner.py's module docstring says why)."""

from __future__ import annotations

import functools

import torch


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
