"""The grammar engine: XGrammar (the `structured` extra), one GrammarBackend per tokenizer. It compiles a
GrammarSpec once (cached by the spec: a compiled grammar serves every request that asks for it) and
gives each constrained row a RowGrammar: its matcher, which accepts the token the row drew; fill_masks
writes a batch of rows' allowed-token bitmasks for their next draws at once.

Token strings reach XGrammar as tokenizer.json spells them, with the encoding it must undo (byte-level
BPE, SentencePiece byte fallback, or raw); special tokens other than the stop tokens are left out (an
empty string: never allowed), so a grammar's text cannot contain a chat template's markers. The stop
tokens are allowed exactly where the grammar may end. JSON grammars also never allow a token holding a
control byte other than newline: JSON strings admit none raw, and XGrammar's length-bounded strings would
let them through.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from ..errors import GrammarError, InvalidRequestError
from . import utf8
from .spec import GrammarSpec


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError("structured output (response_format, guided_*) needs XGrammar: "
                                  "pip install 'edgellm[structured]'") from None
    return xgrammar


def _encoding(backend_json: str, vocab: dict) -> tuple[str, bool]:
    """(XGrammar's vocabulary type name, add_prefix_space) from the tokenizer's serialized pipeline."""
    spec = json.loads(backend_json)
    parts = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")])
    if '"ByteLevel"' in json.dumps(spec.get("decoder")):
        return "BYTE_LEVEL", False
    prefix = '"Metaspace"' in parts and '"prepend_scheme": "never"' not in parts or '"Prepend"' in parts
    if "<0x0A>" in vocab or '"ByteFallback"' in parts:
        return "BYTE_FALLBACK", prefix
    return "RAW", prefix


# Bytes a JSON answer never needs raw: strings escape every control character, and the grammars are compiled
# without free whitespace; newline stays (a tool call's literals hold one; XGrammar's strings exclude it).
_CONTROL = frozenset(range(32)) - {10}


def _token_bits(allowed) -> torch.Tensor:
    """[ceil(n / 32)] int32 words, bit j of word i set where allowed[32 i + j] (a list of bools or a bool
    tensor; XGrammar's layout)."""
    allowed = torch.as_tensor(allowed, dtype=torch.bool)
    bits = torch.cat([allowed, allowed.new_zeros(-len(allowed) % 32)]).to(torch.int64).view(-1, 32)
    words = (bits << torch.arange(32, dtype=torch.int64)).sum(1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _tokens_bits(tokens, vocab_size: int) -> torch.Tensor:
    """_token_bits of the tokens listed (ids below vocab_size) set, every other clear."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[torch.tensor(list(tokens), dtype=torch.int64)] = True
    return _token_bits(allowed)


class RowGrammar:
    """One row's matcher: fill_masks() the allowed tokens of its next draw, accept() what it drew."""

    def __init__(self, matcher, backend: "GrammarBackend", only: torch.Tensor | None = None):
        """only: [words] bits every mask is narrowed to (None: the grammar's own)."""
        self._matcher = matcher
        self._backend = backend
        self._only = only
        self.utf8 = 0  # where its bytes stand inside a UTF-8 character (grammar/utf8.py STATES)

    def accept(self, token: int) -> bool:
        """False where the grammar refuses the token (the row must stop: its mask did not hold)."""
        if not self._matcher.accept_token(token):
            return False
        self.utf8 = self._backend.utf8_after[self.utf8].get(token, 0)  # (grammar/utf8.py)
        return True

    @property
    def terminated(self) -> bool:
        """A stop token was accepted where the grammar may end."""
        return bool(self._matcher.is_terminated())


FILL_THREADS = 1


def fill_masks(rows: list[RowGrammar]) -> torch.Tensor:
    """The next draw's allowed tokens of each row (of one GrammarBackend), [len(rows), words] int32 bits
    (a reused buffer: read it before the next call), filled in one call into XGrammar, then narrowed
    (the JSON rows' control characters) in one operation per narrowing mask, not one per row."""
    backend = rows[0]._backend
    words = backend.mask_buffer(len(rows))
    if len(rows) == 1:
        rows[0]._matcher.fill_next_token_bitmask(words, 0)
    else:
        backend.batch.batch_fill_next_token_bitmask([row._matcher for row in rows], words)
    narrowed: dict[tuple, tuple[torch.Tensor, list[int]]] = {}
    for i, row in enumerate(rows):
        if row._only is not None:
            narrowed.setdefault(("only", id(row._only)), (row._only, []))[1].append(i)
        narrowed.setdefault(("utf8", row.utf8), (backend.utf8_masks[row.utf8], []))[1].append(i)
    for only, index in narrowed.values():
        if len(index) == len(rows):
            words &= only
        else:
            words[index] &= only
    return words


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        """tokenizer: edgellm's Tokenizer; vocab_size: the model's (the logits' full width, the masks');
        stop_token_ids: the tokens that end a row (end of sequence)."""
        xg = _xgrammar()
        vocab = tokenizer.vocab()
        stops = sorted(set(stop_token_ids))
        if not stops:
            raise InvalidRequestError("structured output needs an end-of-sequence token (the grammar's end); "
                                      "this model's tokenizer names none")
        hidden = set(tokenizer.added_token_ids(special_only=True)) - set(stops)
        encoded = [""] * vocab_size
        for token, i in vocab.items():
            if i < vocab_size and i not in hidden:
                encoded[i] = token
        kind, prefix = _encoding(tokenizer.backend_json(), vocab)
        self.info = xg.TokenizerInfo(encoded, getattr(xg.VocabType, kind), vocab_size=vocab_size,
                                     stop_token_ids=stops, add_prefix_space=prefix)
        self.words = (vocab_size + 31) // 32
        decoded = [bytes(token) for token in self.info.decoded_vocab]  # (read once: 0.5 s a read at 128k tokens)
        self._json_safe = _token_bits([not _CONTROL.intersection(token) for token in decoded] +
                                      [True] * (vocab_size - len(decoded)))
        self.utf8_after = utf8.transitions(decoded + [b""] * (vocab_size - len(decoded)))
        self.utf8_masks = [_tokens_bits(after, vocab_size) for after in self.utf8_after]
        self._compiler = xg.GrammarCompiler(self.info, max_threads=4)
        # One thread: a mask from XGrammar's cache takes 1-2 us a row (128k vocabulary), and handing 16
        # rows to more threads cost 70 us (2 cores) to 290 us (the H100 host) a batch (bench/grammar_masks.py).
        self.batch = xg.BatchGrammarMatcher(max_threads=FILL_THREADS)
        self._masks = torch.zeros(0, self.words, dtype=torch.int32)
        self._compiled: dict[GrammarSpec, object] = {}
        self._lock = threading.Lock()
        self._xg = xg

    def compile(self, spec: GrammarSpec):
        """The compiled grammar (cached by spec); InvalidRequestError naming what the backend refused."""
        with self._lock:
            found = self._compiled.get(spec)
        if found is not None:
            return found
        compiler = self._compiler
        try:
            if spec.kind == "json_object":  # (OpenAI's JSON mode: an object, any keys)
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif spec.kind == "json_schema":
                compiled = compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.source)
            elif spec.kind == "tagged_json":
                parts = json.loads(spec.source)
                xg = self._xg
                literal = lambda text: [xg.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")] if text else []  # noqa: E731
                pieces = literal(parts["prefix"]) + [xg.Grammar.from_json_schema(
                    json.dumps(parts["schema"]), any_whitespace=False, strict_mode=True)] + literal(parts["suffix"])
                compiled = compiler.compile_grammar(xg.Grammar.concat(*pieces))
            elif spec.kind == "choice":
                choices = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec.source))
                compiled = compiler.compile_grammar(f"root ::= {choices}")
            else:
                compiled = compiler.compile_grammar(spec.source)
        except Exception as exc:  # noqa: BLE001 (XGrammar raises RuntimeError/ValueError with the reason)
            what = {"json_object": "JSON grammar", "json_schema": "JSON schema", "regex": "regular expression",
                    "choice": "choice list", "ebnf": "EBNF grammar", "tagged_json": "tool schema"}[spec.kind]
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip().splitlines()[0])  # (XGrammar's source line)
            raise GrammarError(f"the {what} cannot be used: {reason}") from None
        with self._lock:
            self._compiled[spec] = compiled
        return compiled

    def row(self, spec: GrammarSpec) -> RowGrammar:
        only = self._json_safe if spec.kind in ("json_object", "json_schema", "tagged_json") else None
        return RowGrammar(self._xg.GrammarMatcher(self.compile(spec)), self, only)

    def mask_buffer(self, rows: int) -> torch.Tensor:
        """[rows, words] int32 host rows fill_masks writes (grown as batches grow; one engine loop uses it)."""
        if self._masks.shape[0] < rows:
            self._masks = torch.zeros(max(rows, 2 * self._masks.shape[0]), self.words, dtype=torch.int32)
        return self._masks[:rows]
