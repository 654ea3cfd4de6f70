"""Triton's interpreter, with `triton.language` swapped once for the session (test speed only).

The interpreter swaps `triton.language`'s builtins for numpy-backed ones at every kernel launch
and at every call of a `@triton.jit` helper inside one (a walk over the module with
`inspect.getmembers`, ~2 ms), then puts them back after the launch: in a tiny model's decode step
that walk took over a third of the time. Nothing in the test process uses those builtins outside a
kernel, so here the first launch swaps them and they stay swapped; every op still runs through the
interpreter's own implementation. Installed by conftest.py when the interpreter is on; a triton
without these internals runs unpatched, only slower."""

from __future__ import annotations

import inspect
import threading


def install() -> bool:
    """Replace the interpreter's per-call patching once; False where triton's internals differ."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope")) or \
            getattr(interpreter, "_edgellm_patched", False):
        return False
    patch_lang = interpreter._patch_lang
    swapped: set[int] = set()  # ids of the language modules swapped for good
    seen: dict[object, frozenset[int]] = {}
    lock = threading.Lock()

    def patch_once(fn):
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        with lock:
            if not seen[fn] <= swapped:
                patch_lang(fn)  # its scope is dropped unrestored: the swap stays
                swapped.update(seen[fn])
        return interpreter._LangPatchScope()  # what the launch restores afterwards: nothing

    interpreter._patch_lang = patch_once
    interpreter._edgellm_patched = True
    return True
