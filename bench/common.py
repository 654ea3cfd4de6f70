"""What several bench/ scripts share beyond edgellm.benchmark (which `edgellm bench` uses): the
command-line options of the scripts that decode a named shape, and a synthetic tokenizer for
random-weight models. Scripts put the repository root on sys.path and import `bench.common`."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm.benchmark import SHAPES


def decode_parser(description: str) -> argparse.ArgumentParser:
    """The options the bench/ scripts that decode a named shape share (--json, --shape, --batch,
    --osl, --iterations)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    return parser


def write_synthetic_tokenizer(model_dir: str | Path, vocab_size: int, seed: int = 0) -> None:
    """A byte-level BPE tokenizer.json of exactly `vocab_size` tokens in `model_dir` (kept if one is
    there): the 256 byte symbols, then random words, most with a leading space. Random-weight models
    then write text of a plausible shape, for benchmarks of the text path (detokenization, stop
    strings, streaming)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edgellm.tokenizer import _byte_level_alphabet

    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        return
    rng = random.Random(seed)
    vocab = {symbol: i for i, symbol in enumerate(_byte_level_alphabet())}
    while len(vocab) < vocab_size:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
        vocab.setdefault(("\u0120" if rng.random() < 0.7 else "") + word, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))
