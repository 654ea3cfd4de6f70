"""Incremental detokenization, stop-string search and streaming deltas (edgellm/streaming.py)
against the tokenizer's full decode of the same ids."""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from edgellm.streaming import IncrementalDecoder, RowText, TextStreamer, first_stop
from edgellm.tokenizer import Tokenizer

TEXT = ("Hello world! Straße, naïve café — 東京タワー 🎉🎉 and emoji 👩‍👩‍👧 mixed with code: "
        "def f(x):\n    return x ** 2  # done\n\n\tTabs, \"quotes\" and 'apostrophes'.")


def metaspace_tokenizer() -> HFTokenizer:
    """A SentencePiece-style tokenizer (Metaspace: spaces as U+2581, stripped before the first
    word on decode) with byte fallback, trained on a little text: the other common decoder."""
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"] + alphabet))
    return tok


def decoders_under_test(default_model_dir):
    byte_level = Tokenizer.from_dir(default_model_dir)
    metaspace = metaspace_tokenizer()
    return {"byte-level BPE": (byte_level.encode, byte_level.decode),
            "metaspace + byte fallback": (lambda t: metaspace.encode(t).ids,
                                          lambda ids: metaspace.decode(list(ids), skip_special_tokens=True))}


def test_incremental_decoding_equals_the_full_decode(default_model_dir):
    rng = random.Random(0)
    for name, (encode, decode) in decoders_under_test(default_model_dir).items():
        ids = encode(TEXT)
        sequences = [ids, ids[3:], [rng.randrange(len(ids)) for _ in range(5)]]
        sequences.append([i for i in range(60, 400)][::7])  # arbitrary ids: pieces of multi-byte characters
        for seq in sequences:
            decoder = IncrementalDecoder(decode)
            pieces = []
            for token in seq:
                piece = decoder.push(token)
                assert not piece.endswith("\ufffd")  # only complete characters come out before the end
                pieces.append(piece)
                assert "".join(pieces) == decode(seq[:len(pieces)])[:len("".join(pieces))], name
            assert "".join(pieces) + decoder.finish() == decode(seq), name


def test_a_split_character_comes_out_when_complete(default_model_dir):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1  # the emoji's bytes span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer.decode)
    assert [decoder.push(t) for t in ids] == [""] * (len(ids) - 1) + ["🎉"]


def test_first_stop_searches_only_new_text_plus_the_overlap():
    assert first_stop("abc END def", ["END"], since=0) == (4, "END")
    assert first_stop("abc EN", ["END"], since=4) is None
    assert first_stop("abc END", ["END"], since=6) == (4, "END")  # the stop straddles the old and the new text
    assert first_stop("END abc", ["END"], since=6) is None  # searched before
    assert first_stop("x STOP y END", ["END", "STOP"], since=0) == (2, "STOP")  # the earliest of several
    assert first_stop("x ENDING", ["ENDING", "END"], since=0) == (2, "ENDING")  # one index: the first listed


@pytest.mark.parametrize("stop", ["wor", "ld!", "Hello world! S", "🎉 and", "never there"])
def test_row_text_matches_the_full_decode_cut_at_the_stop(default_model_dir, stop):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    ids = tokenizer.encode(TEXT)
    row = RowText(tokenizer.decode, [stop, "\n\n\n\n"], stream=True)
    streamed, stopped_at = [], None
    for n, token in enumerate(ids, 1):
        stopped = row.push(token, last=n == len(ids))
        streamed.append(row.delta(final=stopped or n == len(ids)))
        if stopped:
            stopped_at = n
            break
    full = tokenizer.decode(ids[:stopped_at or len(ids)])
    expected = full[:full.index(stop)] if stop in full else full
    assert row.text == expected and "".join(streamed) == expected
    assert (stopped_at is not None) == (stop in TEXT)
    assert row.stop == (stop if stop in TEXT else None)
    if stopped_at is not None:  # it stopped at the first token whose text completes the stop string
        before = tokenizer.decode(ids[:stopped_at - 1])
        assert stop not in before


def test_text_streamer_holds_back_possible_stop_prefix_and_partial_chars():
    streamer = TextStreamer(holdback=2)
    assert streamer.delta("Hello") == "Hel"
    assert streamer.delta("Hello wor") == "lo w"
    assert streamer.delta("Hello wor\ufffd") == ""
    assert streamer.delta("Hello world", final=True) == "orld"
