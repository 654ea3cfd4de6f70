"""Launched: a step of the engine loop queued on the device and not yet read."""

from __future__ import annotations

import dataclasses

from .sequence import Sequence


@dataclasses.dataclass
class Launched:
    """A step queued on the device and not yet read: the decode rows it advances (in the batch's order
    then), its PendingTokens, and the prompt chunk it prefilled ((sequence, tokens, whether the chunk
    ends the prompt) per chunk row; their first tokens come first in the step's tokens)."""
    rows: list[Sequence]
    pending: object
    chunks: list[tuple[Sequence, int, bool]] = dataclasses.field(default_factory=list)
    began: float = 0.0
