"""The host's share of a constrained decode step, piece by piece: 16 rows of bench/structured_decode.py's
JSON schema (a 128k-token synthetic vocabulary) inside a string and at an object's key, their next-token
masks filled one by one and through XGrammar's BatchGrammarMatcher at 1, 2, 4, 8 and "auto" threads; the
JSON rows' narrowing (control characters out) row by row and at once; the masks' copy to the GPU from
pageable and from pinned memory, alone and behind a long matmul; and 16 matchers accepting a token one by
one. Medians in microseconds. What edgellm/grammar/backend.py (FILL_THREADS) and
edgellm/engine/logit_processing.py (pinned staging) chose from.

Run:  python bench/grammar_masks.py [--rows 16] [--vocab 128256]   (the copies need a CUDA GPU)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/
sys.path.insert(1, str(Path(__file__).resolve().parent))  # (after it: bench/common.py, bench/structured_decode.py)

import torch  # noqa: E402

from common import write_synthetic_tokenizer  # noqa: E402
from edgellm.grammar.backend import GrammarBackend  # noqa: E402
from edgellm.grammar.spec import grammar_spec  # noqa: E402
from edgellm.tokenizer import Tokenizer  # noqa: E402
from structured_decode import FORMAT  # noqa: E402


def median_us(call, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgellm-masks-"))
    write_synthetic_tokenizer(folder, args.vocab)
    tokenizer = Tokenizer.from_dir(folder)
    spec = grammar_spec(FORMAT)
    began = time.perf_counter()
    backend = GrammarBackend(tokenizer, args.vocab, [0])
    print(f"the backend for {args.vocab} tokens made in {(time.perf_counter() - began) * 1e3:.0f} ms")
    xg = backend._xg
    words = torch.zeros(args.rows, backend.words, dtype=torch.int32)

    def matchers_after(text: str):
        rows = [backend.row(spec) for _ in range(args.rows)]
        for row in rows:
            for token in tokenizer.encode(text, add_special_tokens=False):
                assert row.accept(token), text
        return [row._matcher for row in rows]

    for state, text in (("in a string", '{"title": "'), ("at a key", "{")):
        matchers = matchers_after(text)
        print(f"{args.rows} rows {state}: one by one {median_us(lambda: [m.fill_next_token_bitmask(words, i) for i, m in enumerate(matchers)]):.0f} us")
        for threads in (1, 2, 4, 8, "auto"):
            batch = xg.BatchGrammarMatcher(max_threads=threads)
            print(f"  batch, {threads} threads: {median_us(lambda: batch.batch_fill_next_token_bitmask(matchers, words)):.0f} us")
    only = backend._json_safe
    print(f"narrowing row by row {median_us(lambda: [words[i].__iand__(only) for i in range(args.rows)]):.0f} us, "
          f"at once {median_us(lambda: words.__iand__(only)):.0f} us")
    matchers = matchers_after('{"title": "')
    print(f"accepting a token one by one {median_us(lambda: ([m.accept_token(random.randrange(300, args.vocab - 300)) for m in matchers], [m.rollback(1) for m in matchers]), 50):.0f} us (with a rollback each)")
    batch = xg.BatchGrammarMatcher(max_threads=1)
    print(f"  in one batch_accept_token {median_us(lambda: (batch.batch_accept_token(matchers, [random.randrange(300, args.vocab - 300) for _ in matchers]), [m.rollback(1) for m in matchers]), 50):.0f} us (with a rollback each)")
    print(f"  rollbacks alone {median_us(lambda: [m.rollback(0) for m in matchers], 50):.0f} us")
    if not torch.cuda.is_available():
        return
    device_masks = torch.zeros(args.rows, backend.words, dtype=torch.int32, device="cuda")
    pinned = torch.zeros(args.rows, backend.words, dtype=torch.int32).pin_memory()

    def pageable():
        index = torch.tensor(list(range(args.rows)), dtype=torch.int64).to("cuda", non_blocking=True)
        device_masks.index_copy_(0, index, words.to("cuda", non_blocking=True))

    def from_pinned():
        pinned.copy_(words)
        device_masks.copy_(pinned, non_blocking=True)

    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for name, copy in (("pageable", pageable), ("pinned", from_pinned)):
        torch.cuda.synchronize()
        alone = median_us(copy)
        behind = []
        for _ in range(20):
            torch.cuda.synchronize()
            busy @ busy
            began = time.perf_counter()
            copy()
            behind.append(time.perf_counter() - began)
        print(f"copy from {name} memory: {alone:.0f} us, behind a matmul {sorted(behind)[10] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
