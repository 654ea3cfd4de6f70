"""Which tokens keep a constrained row's bytes valid UTF-8. A grammar engine may take bytes that no UTF-8
decoder accepts (a surrogate or overlong sequence that byte-level tokens spell one byte at a time),
which then decode as several U+FFFD and break a string's length bounds. So each constrained row also
carries where it stands inside a character (one of STATES), and its mask keeps only the tokens whose
bytes are valid from there.

States: 0 at a character boundary; otherwise the continuation bytes still due and the range the next one
must lie in (RFC 3629: after E0 only A0-BF, after ED only 80-9F, after F0 only 90-BF, after F4 only 80-8F).
"""

from __future__ import annotations

# (continuation bytes still due, lowest next byte, highest next byte); state 0 is the boundary.
STATES = ((0, 0, 0), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (3, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F),
          (3, 0x90, 0xBF), (3, 0x80, 0x8F))
_STATE = {spec: i for i, spec in enumerate(STATES)}


def _after_lead(byte: int) -> int | None:
    """The state after a character's first byte (None: no character starts with it)."""
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if byte == 0xE0:
        return 4
    if byte == 0xED:
        return 5
    if 0xE1 <= byte <= 0xEF:
        return 2
    if byte == 0xF0:
        return 6
    if byte == 0xF4:
        return 7
    if 0xF1 <= byte <= 0xF3:
        return 3
    return None


def step(state: int, data: bytes) -> int | None:
    """The state after `data` from `state` (None: the bytes are not valid UTF-8 there)."""
    for byte in data:
        due, low, high = STATES[state]
        if due == 0:
            state = _after_lead(byte)
            if state is None:
                return None
        elif low <= byte <= high:
            state = _STATE[(due - 1, 0x80, 0xBF)] if due > 1 else 0
        else:
            return None
    return state


def transitions(vocab: list[bytes]) -> list[dict[int, int]]:
    """For each state, {token: the state after it} of the tokens valid there. An empty token (a special
    one) is valid only at a boundary; ASCII-only tokens (most of a vocabulary) only there too."""
    table: list[dict[int, int]] = [{} for _ in STATES]
    for token, data in enumerate(vocab):
        if not data or max(data) < 0x80:
            table[0][token] = 0
            continue
        for state in range(len(STATES)):
            after = step(state, data)
            if after is not None:
                table[state][token] = after
    return table
