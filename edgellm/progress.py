"""Progress of long work (weights of multi-file checkpoints, the default model's conversion, graph
capture up front, quantization and its calibration, reduce-vocab's generation, `edgellm run`'s
batches), on stderr: a tqdm bar where stderr is a terminal; elsewhere (a pipe, a log file) a plain
line at most every PLAIN_EVERY_S seconds with done/total and the rate, and one when it ends. Nothing
when EDGELLM_QUIET=1 (the CLI's --quiet sets it)."""

from __future__ import annotations

import sys
import time

from .engine.switches import progress_quiet

PLAIN_EVERY_S = 5.0


def progress(iterable, *, desc: str = "", unit: str = "it"):
    """`iterable`, reporting how far it has got as it is consumed."""
    if progress_quiet():
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    return _plain_lines(iterable, _length(iterable), desc, unit)


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _plain_lines(iterable, total: int | None, desc: str, unit: str):
    """The items of `iterable`; a line on stderr when PLAIN_EVERY_S has passed since the last, and a
    last one if any was written (short work stays silent)."""
    began = last = time.monotonic()
    done, wrote = 0, False
    of = f"/{total}" if total is not None else ""
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S:
            rate = done / (now - began)
            left = f", ~{(total - done) / rate:.0f} s left" if total is not None and rate > 0 else ""
            print(f"{desc}: {done}{of} {unit}s ({rate:.2f} {unit}/s{left})", file=sys.stderr, flush=True)
            last, wrote = now, True
    if wrote:
        print(f"{desc}: {done}{of} {unit}s done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
