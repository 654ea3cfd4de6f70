"""Corpora for vocabulary reduction: what a deployment will be asked and answer.

Accepted: a `.txt` file (one sample per line, all of it "text"), a `.jsonl` file whose lines hold
`text`, or `messages` (a chat; the last assistant turn is the response, the turns before it the
input), or `prompt` + `response`; or a directory of such files (read in name order)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import CorpusError

SUFFIXES = (".txt", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Sample:
    input: str | list[dict] | None   # prompt text, or chat messages before the response
    response: str | None             # what the model answered (None: a plain text sample)
    text: str | None = None          # a plain text sample (`.txt` lines, `text` fields)


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise CorpusError(f"{path} holds no {' or '.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path}")
    if path.suffix not in SUFFIXES:
        raise CorpusError(f"{path}: a corpus file must be .txt (one sample per line) or .jsonl")
    return [path]


def read_corpus(path: str | Path, max_samples: int | None = None) -> list[Sample]:
    samples: list[Sample] = []
    for file in corpus_files(path):
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"cannot read {file}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            samples.append(Sample(None, None, line) if file.suffix == ".txt" else _json_sample(line, file, number))
            if max_samples is not None and len(samples) >= max_samples:
                return samples
    if not samples:
        raise CorpusError(f"the corpus {path} has no samples")
    return samples


def corpus_digest(path: str | Path) -> str:
    """blake2b of the corpus files' names and bytes, in reading order (recorded with the map)."""
    digest = hashlib.blake2b(digest_size=16)
    for file in corpus_files(path):
        digest.update(file.name.encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _json_sample(line: str, file: Path, number: int) -> Sample:
    where = f"{file}:{number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CorpusError(f"{where}: not a JSON line ({exc})") from exc
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: each line must be a JSON object")
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise CorpusError(f"{where}: messages must be objects with string `content`")
        if messages and messages[-1].get("role") == "assistant":
            return Sample(messages[:-1], messages[-1]["content"])
        return Sample(messages, None)
    if isinstance(record.get("prompt"), str):
        response = record.get("response", record.get("completion"))
        if response is not None and not isinstance(response, str):
            raise CorpusError(f"{where}: `response` must be a string")
        return Sample(record["prompt"], response)
    if isinstance(record.get("text"), str):
        return Sample(None, None, record["text"])
    raise CorpusError(f"{where}: expected a `text`, `messages` or `prompt` (+ `response`) field")
