"""The engine loop's handling of rows that follow a grammar (structured output; serving/engine_loop.py).

A constrained row's next token mask follows from the token it drew last, so its steps cannot run ahead.
While one runs, a plain decode step goes in halves: its forward is queued first, then the step before it
is read (each constrained row's matcher accepts its token; the due rows' next masks are filled together
on the grammar engine's threads and copied behind the forward), then its draw. The host's work on step n
thus still hides behind the device's forward of step n + 1.
"""

from __future__ import annotations

import logging

from ..grammar.backend import fill_masks
from .launched import Launched
from .sequence import Sequence

log = logging.getLogger("edgellm")


def constrained(loop) -> bool:
    """Some running row follows a grammar: each step is read before the next is launched (no run-ahead)."""
    return any(seq.grammar is not None for seq in loop.scheduler.running)


def launches_halves(loop) -> bool:
    """A constrained row runs, and the step may go in halves: the runner has them, no row needs its
    step's rows first (run-ahead's rule), and no step in flight is a mixed one (reading it may add rows
    to the batch, which must not change between a step's halves)."""
    return constrained(loop) and loop.runner.launches_halves and loop._may_run_ahead() and \
        not any(step.chunks for step in loop._in_flight)


def decode_in_halves(loop) -> None:
    """A decode step's forward queued, then every step in flight read (the constrained rows' next masks
    set, queued behind that forward), then its draw: the host's reading overlaps the forward."""
    rows = list(loop.batch)
    loop._count_decode_step()
    loop.step_counts["decode_in_halves"] += 1
    loop.runner.decode_launch_forward()
    while loop._in_flight:
        loop._take(loop._in_flight.popleft())
    loop._in_flight.append(Launched(rows, loop.runner.decode_launch_sample()))


def accept(seq: Sequence, tokens: list[int]) -> tuple[list[int], bool]:
    """A constrained row's new tokens (drawn under its mask) through its matcher, which stops at its end
    (EOS where it may end): (the tokens it accepted, whether it refused one)."""
    grammar = seq.grammar
    accepted = 0
    while accepted < len(tokens) and not grammar.terminated and grammar.accept(tokens[accepted]):
        accepted += 1
    return tokens[:accepted], accepted < len(tokens) and not grammar.terminated


def after_advance(loop, seq: Sequence, refused: bool, on_text) -> None:
    """A constrained row that has not finished: at its grammar's end (or on a token its matcher refused,
    which its mask should have ruled out) it stops, its held text flushed; else its next mask is due."""
    if refused or seq.grammar.terminated:
        if refused:
            log.warning("a grammar refused a token its mask allowed; the row ends there")
        seq.row.finish_reason = "stop"
        text = seq.row.live_text
        if text is not None and on_text is not None:
            rest = text.delta(final=True)
            if rest:
                on_text(0, rest)
        return
    loop._masks_due.append(seq)


def set_masks(loop) -> None:
    """The due constrained rows' next token masks, filled together and queued behind the steps in flight."""
    due = [seq for seq in loop._masks_due if not seq.done]
    loop._masks_due.clear()
    if due:
        loop.runner.set_token_masks([seq.slot for seq in due], fill_masks([seq.grammar for seq in due]))
