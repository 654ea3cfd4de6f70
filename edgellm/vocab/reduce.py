"""`reduce_vocab`: a corpus and a model in, a reduced-vocabulary map out (what
`edgellm reduce-vocab` runs). See select.py for the methods and corpus.py for the corpus formats."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from ..engine.config import EngineConfig
from ..engine.vocab_map import check_vocab_map, save_vocab_map
from ..errors import ConfigurationError
from ..models import generation_config, resolve_model_dir, stop_token_ids
from ..progress import progress as progress_bar
from ..tokenizer import Tokenizer
from .corpus import Sample, corpus_digest, read_corpus
from .select import choose, rank_frequency, rank_input_aware, required_ids

METHODS = ("frequency", "input_aware", "self")


@dataclasses.dataclass
class ReducedVocab:
    vocab_map: torch.Tensor   # int32 [size]: reduced id -> full id, ascending
    info: dict                # what reduced_vocab.json records


def reduce_vocab(model: str | Path | None, corpus: str | Path, size: int, method: str = "input_aware", *,
                 output: str | Path | None = None, max_samples: int | None = None, tolerance: float = 0.02,
                 max_new_tokens: int = 128, batch_size: int = 8, device: str | None = None,
                 progress: Callable[[str], None] | None = None) -> ReducedVocab:
    """Build a map of `size` token ids for `model` from `corpus` (and write it to `output`).

    method: "frequency", "input_aware" (default) or "self" (the model answers the corpus inputs
    itself, greedily, up to max_new_tokens each, batch_size at a time; runs the runtime on `device`).
    """
    if method not in METHODS:
        raise ConfigurationError(f"unknown vocabulary reduction method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 <= tolerance < 1:
        raise ConfigurationError(f"tolerance must be in [0, 1), got {tolerance}")
    model_dir = resolve_model_dir(model)
    tokenizer = Tokenizer.from_dir(model_dir)
    vocab_size, stop_ids = _vocab_and_stops(model_dir, tokenizer)
    required = required_ids(tokenizer, stop_ids, vocab_size)
    if size > vocab_size:
        raise ConfigurationError(f"--size {size} is larger than the model's vocabulary of {vocab_size}")
    if size < len(required):
        raise ConfigurationError(f"--size {size} is below the {len(required)} tokens every map keeps (special, "
                                 f"chat-template and byte tokens); ask for at least {len(required)}")
    samples = read_corpus(corpus, max_samples)
    say = progress or (lambda _: None)
    say(f"{len(samples)} samples from {corpus}; {len(required)} required tokens; method {method}")
    if method == "self":
        samples = _self_answers(model_dir, samples, max_new_tokens, batch_size, device, say)
    inputs, responses = _tokenize(tokenizer, samples)
    rank = rank_frequency if method == "frequency" else rank_input_aware
    ids = choose(rank(inputs, responses), required, size, vocab_size, tolerance if method != "frequency" else 0.0)
    vocab_map = check_vocab_map(torch.tensor(ids), vocab_size, stop_ids)
    kept = set(ids)
    counted = [t for r in responses if r for t in r] or [t for i in inputs for t in i]
    info = {"vocab_size": vocab_size, "reduced_vocab_size": len(ids), "method": method,
            "corpus": str(corpus), "corpus_digest": corpus_digest(corpus), "samples": len(samples),
            "required_tokens": len(required),
            "tokens_covered_percent": round(100 * sum(t in kept for t in counted) / max(len(counted), 1), 3),
            "covered_over": "responses" if any(responses) else "corpus text"}
    if output is not None:
        path = save_vocab_map(output, vocab_map, info)
        say(f"wrote {path} ({len(ids)} of {vocab_size} ids; they cover {info['tokens_covered_percent']}% of the "
            f"tokens of the {info['covered_over']})")
    return ReducedVocab(vocab_map, info)


def _vocab_and_stops(model_dir: Path, tokenizer: Tokenizer) -> tuple[int, frozenset[int]]:
    config = EngineConfig.from_model_dir(model_dir)
    return config.vocab_size, stop_token_ids(config.eos_token_ids, generation_config(model_dir), tokenizer)


def _tokenize(tokenizer: Tokenizer, samples: list[Sample]) -> tuple[list[list[int]], list[list[int] | None]]:
    inputs, responses = [], []
    for s in samples:
        if s.text is not None:
            inputs.append(tokenizer.encode(s.text, add_special_tokens=False))
            responses.append(None)
            continue
        if isinstance(s.input, list):
            prompt = tokenizer.encode_chat(s.input) if tokenizer.chat_template else \
                tokenizer.encode(" ".join(m["content"] for m in s.input), add_special_tokens=False)
        else:
            prompt = tokenizer.encode(s.input or "", add_special_tokens=False)
        inputs.append(prompt)
        responses.append(tokenizer.encode(s.response, add_special_tokens=False) if s.response is not None else None)
    return inputs, responses


def _self_answers(model_dir: Path, samples: list[Sample], max_new_tokens: int, batch_size: int, device,
                  say: Callable[[str], None]) -> list[Sample]:
    """The samples with the model's own greedy answers as responses (plain text samples become prompts)."""
    from ..requests import LLMGenerationRequest
    from ..runtime import LLMInferenceRuntime

    runtime = LLMInferenceRuntime(model_dir, device=device, max_batch_size=batch_size)
    say(f"answering {len(samples)} corpus inputs with the model ({max_new_tokens} tokens each)")
    answered = []
    for start in progress_bar(range(0, len(samples), batch_size), desc="answering the corpus", unit="batch"):
        batch = samples[start:start + batch_size]
        items = []
        for s in batch:
            prompt = s.text if s.text is not None else s.input
            if isinstance(prompt, list) and runtime.tokenizer.chat_template:
                items.append({"messages": prompt})
            else:
                items.append({"prompt": prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)})
        response = runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=max_new_tokens,
                                                               temperature=0))
        for s, item, text in zip(batch, items, response.output_texts):
            answered.append(Sample(item.get("messages", item.get("prompt")), text))
    return answered


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
