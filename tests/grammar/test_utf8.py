"""grammar/utf8.py: the UTF-8 states a constrained row's bytes pass through, and the per-state token
tables its masks come from (surrogates, overlongs and stray continuation bytes are never valid)."""

from edgellm.grammar import utf8


def test_valid_text_returns_to_a_boundary_and_invalid_bytes_are_refused():
    assert utf8.step(0, "aé€😀".encode()) == 0
    partial = utf8.step(0, "€".encode()[:2])
    assert partial not in (None, 0) and utf8.step(partial, "€".encode()[2:]) == 0
    for bad in (b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xc0\x80", b"\x80", b"\xf4\x90\x80\x80", b"\xff"):
        assert utf8.step(0, bad) is None, bad
    assert utf8.step(partial, b"a") is None  # (a character left unfinished)


def test_the_tables_allow_what_continues_validly():
    vocab = [b"a", b"", "é".encode(), b"\xed", b"\xa0", b"\x80", "€".encode()[:2], "€".encode()[2:]]
    table = utf8.transitions(vocab)
    assert set(table[0]) == {0, 1, 2, 3, 6}  # boundary: ASCII, the empty token, whole and lead bytes
    after_ed = table[0][3]
    assert set(table[after_ed]) == {5}  # after ED only 80-9F (A0 would make a surrogate, AC too)
    assert table[table[0][6]] == {4: 0, 5: 0, 7: 0}  # E2 82 then any continuation ends the character
