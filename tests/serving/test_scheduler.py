"""The scheduler's bookkeeping (edgellm/serving/scheduler.py): slots given and taken back, admission order
(priority, then arrival), the bounded queue, prefill chunks under a token budget, cancellation."""

import pytest

from edgellm.errors import QueueFullError
from edgellm.serving.scheduler import Scheduler
from edgellm.serving.sequence import Sequence
from edgellm.streaming import GenerationRow


def _seq(prompt_len=4, priority=0):
    return Sequence(prompt=list(range(1, prompt_len + 1)), temperature=0.0, top_k=1, top_p=1.0, seed=0, max_new=8,
                    adapter="", row=GenerationRow(prompt_len, None), priority=priority)


def test_slots_go_to_the_first_waiting_and_come_back():
    scheduler = Scheduler(slots=2)
    a, b, c = _seq(), _seq(), _seq()
    scheduler.add([a, b])
    scheduler.add([c])
    assert scheduler.admit() == [a, b] and (a.slot, b.slot) == (0, 1)
    assert scheduler.admit() == [] and c.slot is None  # no slot free: c waits
    scheduler.retire(a)
    assert scheduler.admit() == [c] and c.slot == 0
    assert scheduler.running == [b, c] and not scheduler.idle


def test_lower_priority_values_first_then_arrival_order():
    scheduler = Scheduler(slots=1)
    late_urgent, early, later = _seq(priority=-1), _seq(), _seq()
    scheduler.add([early])
    scheduler.add([later])
    scheduler.add([late_urgent])
    order = []
    for _ in range(3):
        (seq,) = scheduler.admit()
        order.append(seq)
        scheduler.retire(seq)
    assert order == [late_urgent, early, later]


def test_the_queue_is_bounded_per_request():
    scheduler = Scheduler(slots=1, max_queued=3)
    scheduler.add([_seq(), _seq()])
    with pytest.raises(QueueFullError, match="max_queued 3"):
        scheduler.add([_seq(), _seq()])  # all of a request or none
    assert len(scheduler.waiting) == 2
    scheduler.admit()  # one leaves the queue for the slot
    scheduler.add([_seq(), _seq()])
    assert len(scheduler.waiting) == 3


def test_prefill_chunks_share_the_budget_least_prompt_left_first():
    """The chunk's rows, each computed at the first's (padded) length, stay within the budget."""
    scheduler = Scheduler(slots=3)
    long, short, other = _seq(10), _seq(3), _seq(5)
    scheduler.add([long, short, other])
    scheduler.admit()
    assert scheduler.prefill_chunks(7) == [(short, 3), (other, 3)]  # 2 rows x 3 <= 7; a third would not fit
    assert scheduler.prefill_chunks(9) == [(short, 3), (other, 3), (long, 3)]
    short.prefilled, other.prefilled = 3, 3
    assert scheduler.prefill_chunks(8) == [(other, 2), (long, 2)]
    assert scheduler.prefill_chunks(8, pad=lambda tokens: 4) == [(other, 2), (long, 4)]  # rows padded to 4
    assert scheduler.prefill_chunks(7, pad=lambda tokens: 4) == [(other, 2)]
    other.prefilled = 5
    assert scheduler.prefill_chunks(8) == [(long, 8)]
    assert scheduler.prefill_chunks(2, whole=True) == [(long, 10)]  # (the first whatever the budget)
    long.prefilled = 10
    assert scheduler.prefill_chunks(8) == []
    assert scheduler.decoding() == [long, short, other]


def test_cancelled_sequences_are_skipped_and_dropped():
    scheduler = Scheduler(slots=1)
    running, waiting, after = _seq(), _seq(), _seq()
    scheduler.add([running, waiting, after])
    scheduler.admit()
    waiting.cancelled = True
    assert scheduler.drop_cancelled_waiting() == [waiting]
    running.cancelled = True
    assert scheduler.prefill_chunks(8) == [] and scheduler.decoding() == []
    scheduler.retire(running)
    assert scheduler.admit() == [after]


def test_admission_restricted_to_some_sequences_keeps_the_others_places():
    scheduler = Scheduler(slots=2)
    first, mine, last = _seq(), _seq(), _seq()
    scheduler.add([first, mine, last])
    assert scheduler.admit(only={mine}) == [mine]
    assert scheduler.admit() == [first]  # (one slot left: the first in line)
    assert [entry[2] for entry in scheduler.waiting] == [last]
