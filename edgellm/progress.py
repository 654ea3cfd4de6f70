"""Progress bars for long work (weights of multi-file checkpoints, the default model's conversion,
graph capture up front, reduce-vocab's generation): tqdm on stderr, shown only where someone watches
(stderr is a terminal) and EDGELLM_QUIET is not set to 1."""

from __future__ import annotations

import sys

from .engine.switches import progress_quiet


def progress_enabled() -> bool:
    return not progress_quiet() and sys.stderr.isatty()


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar over `iterable` (or a manual one of `total`), disabled where nobody watches."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress_enabled(), leave=False,
                file=sys.stderr, dynamic_ncols=True)
