"""Request and response dataclasses, and the validation that turns bad input into clear errors.

Everything here runs before any model compute: a request that fails validation leaves the runtime
exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from .engine.kv_store import KVReuseStats
from .engine.logit_processing import LogitSettings
from .speculative.config import SpeculativeStats
from .errors import InvalidRequestError
from .tokenizer import ROLES

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_GENERATE_LENGTH = 128


@dataclasses.dataclass
class GenerationItem:
    """One sequence of a batch. Give exactly one of `messages`, `prompt` or `input_ids`.
    `lora_weights_name` overrides the request's adapter for this item ("" = the base model).

    Images (vision-language models): a message's content may be a list of parts, text parts
    {"type": "text", "text": ...} and image parts {"type": "image", "image": PATH_OR_PIL_OR_BYTES};
    a prompt item takes them as `images` (one placeholder each goes in front of the prompt unless it
    already holds them)."""

    messages: list[dict[str, Any]] | None = None  # chat messages; the model's chat template applies
    prompt: str | None = None                     # raw text, no template
    input_ids: list[int] | None = None            # token ids, used as they are
    lora_weights_name: str | None = None
    images: list[Any] | None = None               # with `prompt`: image paths, PIL images or encoded bytes
    response_format: Any = None                   # this item's constraint (as LLMGenerationRequest's)
    tools: list[dict] | None = None               # with `messages`: OpenAI function definitions for the template


@dataclasses.dataclass
class LLMGenerationRequest:
    """A batch of sequences generated together with shared settings.

    temperature / top_k / top_p left as None take the model's generation_config.json values, else
    1.0 / 50 / 1.0. Greedy decoding: temperature=0 or top_k=1. top_k=0 disables top-k.
    lora_weights_name: the LoRA adapter of every item that names none; None = the runtime's active
    adapter (switch_lora_weights), "" = the base model. max_generate_length=None: as many tokens as
    the KV cache holds after each item's prompt.
    """

    requests: list[GenerationItem | dict]
    max_generate_length: int | None = DEFAULT_MAX_GENERATE_LENGTH
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    lora_weights_name: str | None = None
    speculative: bool | None = None  # False: decode this request without the runtime's speculation
    ignore_eos: bool = False  # True: the stop token ids do not end the items (benchmarks; as vLLM's)
    # Logit processing, applied on the device before each draw (vLLM's order: logit_bias, the repetition
    # penalty over prompt and output tokens, frequency and presence penalties over output tokens, then
    # min_p relative to the top token's probability at the item's temperature). Neutral by default.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    # Token logprobs in the response (LLMGenerationResponse.logprobs): each generated token's log-probability
    # under the model's raw logits (before penalties, bias and temperature) and this many most likely
    # alternatives (0-20); None reports none.
    logprobs: int | None = None
    # Structured output: OpenAI's response_format ({"type": "json_object"}, {"type": "json_schema",
    # "json_schema": {"schema": ...}}) or an edgellm.grammar.GrammarSpec (regex, choice, EBNF): each item's
    # output follows it (edgellm/grammar/); an item's own response_format wins.
    response_format: Any = None


@dataclasses.dataclass
class GenerationTimings:
    prefill_ms: float = 0.0         # prompt processing and the first token
    decode_ms: float = 0.0          # every later token
    decode_tokens: int = 0          # tokens produced by decode steps (all rows)
    total_ms: float = 0.0           # the whole request, tokenisation, detokenisation and queue_ms included
    queue_ms: float = 0.0           # waiting for the engine while other callers' requests ran (runtime.py)
    image_preprocess_ms: float = 0.0  # loading and preprocessing the request's images (host)
    vision_ms: float = 0.0          # the vision encoder (not part of prefill_ms)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the raw logits, and the most likely tokens' (id, logprob)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(ids: list[int], rows: list[list[float]], count: int) -> list[TokenLogprob]:
    """Steps' logprob rows (engine/logit_processing.py step_logprobs: the token's value, the top values,
    their ids) as TokenLogprobs with `count` alternatives each."""
    width = (len(rows[0]) - 1) // 2 if rows else 0
    return [TokenLogprob(token, row[0], tuple((int(row[1 + width + i]), row[1 + i]) for i in range(count)))
            for token, row in zip(ids, rows)]


@dataclasses.dataclass
class LLMGenerationResponse:
    output_texts: list[str]
    output_ids: list[list[int]]     # generated ids only, per item (an ending EOS id included)
    finish_reasons: list[str]       # "stop" (EOS id or stop string) or "length"
    prompt_lengths: list[int]
    timings: GenerationTimings
    stop_sequences: list[str | None] = dataclasses.field(default_factory=list)  # the stop string that ended each item
    token_times_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per item: when each token came (ms after submission)
    logprobs: list[list[TokenLogprob]] | None = None  # per item, per token (with LLMGenerationRequest.logprobs)
    kv_reuse: KVReuseStats | None = None  # saved-prefix reuse (engine/kv_store.py), when the runtime has it on
    speculative: SpeculativeStats | None = None  # speculative decoding (edgellm/speculative), when it ran

    def to_dict(self) -> dict:
        out = {
            "output_texts": self.output_texts, "output_ids": self.output_ids,
            "finish_reasons": self.finish_reasons, "stop_sequences": self.stop_sequences,
            "prompt_lengths": self.prompt_lengths,
            "timings": {**dataclasses.asdict(self.timings), "decode_tokens_per_s": self.timings.decode_tokens_per_s},
        }
        if self.kv_reuse is not None:
            out["kv_reuse"] = self.kv_reuse.as_dict()
        if self.speculative is not None:
            out["speculative"] = self.speculative.as_dict()
        if self.logprobs is not None:
            out["logprobs"] = [[dataclasses.asdict(t) for t in item] for item in self.logprobs]
        return out


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_k: int
    top_p: float
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InvalidRequestError(f"{where}: message {j} must be a dict with 'role' and 'content'")
        if message.get("tool_calls") is not None:  # (an assistant's earlier calls, as transformers' templates take them)
            if message["role"] != "assistant" or not isinstance(message["tool_calls"], list):
                raise InvalidRequestError(f"{where}: message {j}: tool_calls is a list, on assistant messages")
            if message["content"] is None:
                continue
        if message["role"] not in ROLES:
            raise InvalidRequestError(f"{where}: message {j} has unknown role {message['role']!r}; "
                                      f"allowed roles: {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, list):
            for part in content:
                text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                image = isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None
                if not (text or image):
                    raise InvalidRequestError(f"{where}: message {j} content parts must be {{'type': 'text', "
                                              "'text': str} or {'type': 'image', 'image': path, PIL image or bytes}")
        elif not isinstance(content, str):
            raise InvalidRequestError(f"{where}: message {j} content must be a string")
    return messages


def normalize_item(item, index: int) -> GenerationItem:
    where = f"request item {index}"
    if isinstance(item, dict):
        unknown = set(item) - {f.name for f in dataclasses.fields(GenerationItem)}
        if unknown:
            raise InvalidRequestError(f"{where}: unknown keys {sorted(unknown)}; "
                                      "allowed: messages, prompt, input_ids, lora_weights_name, images, response_format, tools")
        item = GenerationItem(**item)
    elif not isinstance(item, GenerationItem):
        raise InvalidRequestError(f"{where}: must be a dict or GenerationItem, got {type(item).__name__}")
    if item.lora_weights_name is not None and not isinstance(item.lora_weights_name, str):
        raise InvalidRequestError(f"{where}: lora_weights_name must be a string or None")
    given = [name for name in ("messages", "prompt", "input_ids") if getattr(item, name) is not None]
    if len(given) != 1:
        raise InvalidRequestError(f"{where}: give exactly one of messages, prompt or input_ids "
                                  f"(got {', '.join(given) if given else 'none'})")
    if item.images is not None:
        if item.prompt is None:
            raise InvalidRequestError(f"{where}: images= goes with a prompt item; in messages, put images in the "
                                      "content as {'type': 'image', 'image': ...} parts; input_ids items take none")
        if not isinstance(item.images, (list, tuple)) or not item.images:
            raise InvalidRequestError(f"{where}: images must be a non-empty list of paths, PIL images or bytes")
    if item.tools is not None and (item.messages is None or not isinstance(item.tools, list)):
        raise InvalidRequestError(f"{where}: tools (a list of function definitions) go with messages")
    if item.messages is not None:
        _validate_messages(item.messages, where)
    elif item.prompt is not None:
        if not isinstance(item.prompt, str) or not item.prompt:
            raise InvalidRequestError(f"{where}: prompt must be a non-empty string")
    else:
        ids = item.input_ids
        # The type set first: a 2000-token prompt's per-token isinstance checks cost ~0.2 ms of host
        # time, a third of what a KV hit adds to TTFT; a set of types takes a fifth of that.
        if not isinstance(ids, (list, tuple)) or not ids or \
                (set(map(type, ids)) != {int} and not all(_is_int(t) for t in ids)):
            raise InvalidRequestError(f"{where}: input_ids must be a non-empty list of ints")
    return item


_SEED_STRIDE = 0x632BE5AB  # spreads the per-item seeds of one request apart


def item_seeds(sampling: SamplingSettings, count: int) -> list[int]:
    """The seeds of a request's `count` items: its seed (a random one where it sets none), spread apart."""
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    return [(seed + i * _SEED_STRIDE) & 0xFFFFFFFF for i in range(count)]


def sampling_settings(request: LLMGenerationRequest, defaults: dict) -> SamplingSettings:
    """Resolve None fields from `defaults` (generation_config.json), then edgellm's, and check ranges."""
    def pick(name, fallback):
        value = getattr(request, name)
        return defaults.get(name, fallback) if value is None else value

    temperature = pick("temperature", DEFAULT_TEMPERATURE)
    top_k = pick("top_k", DEFAULT_TOP_K)
    top_p = pick("top_p", DEFAULT_TOP_P)
    if not _is_number(temperature) or temperature < 0:
        raise InvalidRequestError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables top-k, 1 is greedy), got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1] (1 disables top-p), got {top_p!r}")
    if request.seed is not None and not _is_int(request.seed):
        raise InvalidRequestError(f"seed must be an integer or None, got {request.seed!r}")
    return SamplingSettings(float(temperature), int(top_k), float(top_p), request.seed)


def logit_settings(request: LLMGenerationRequest, vocab: int) -> LogitSettings | None:
    """The request's logit processing, checked (None: none asked for)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if not _is_number(getattr(request, name)):
            raise InvalidRequestError(f"{name} must be a number, got {getattr(request, name)!r}")
    if not _is_number(request.repetition_penalty) or request.repetition_penalty <= 0:
        raise InvalidRequestError(f"repetition_penalty must be a number > 0 (1 disables it), got "
                                  f"{request.repetition_penalty!r}")
    if not _is_number(request.min_p) or not 0 <= request.min_p <= 1:
        raise InvalidRequestError(f"min_p must be in [0, 1] (0 disables it), got {request.min_p!r}")
    bias = request.logit_bias or {}
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must be a dict of token id -> bias")
    for token, value in bias.items():
        if not _is_int(token) or not 0 <= token < vocab:
            raise InvalidRequestError(f"logit_bias: token id {token!r} is outside the vocabulary [0, {vocab})")
        if not _is_number(value):
            raise InvalidRequestError(f"logit_bias: the bias of token {token} must be a number, got {value!r}")
    settings = LogitSettings(float(request.presence_penalty), float(request.frequency_penalty),
                             float(request.repetition_penalty), float(request.min_p),
                             tuple(sorted((int(t), float(v)) for t, v in bias.items() if v)))
    return None if settings.neutral else settings


def stop_strings(request: LLMGenerationRequest) -> list[str]:
    stop = request.stop
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop must be a non-empty string or a list of non-empty strings")
    return list(stop)


def validate_request(request: LLMGenerationRequest, *, max_batch_size: int) -> list[GenerationItem]:
    """Shape-level checks that need no tokenizer or model; returns the items as GenerationItems."""
    if not isinstance(request, LLMGenerationRequest):
        raise InvalidRequestError(f"expected an LLMGenerationRequest, got {type(request).__name__}")
    if not isinstance(request.requests, (list, tuple)) or not request.requests:
        raise InvalidRequestError("requests must be a non-empty list of items")
    if len(request.requests) > max_batch_size:
        raise InvalidRequestError(f"{len(request.requests)} items exceed the engine's max_batch_size "
                                  f"{max_batch_size}; split the batch or build the runtime with a larger one")
    if request.max_generate_length is not None and \
            (not _is_int(request.max_generate_length) or request.max_generate_length < 1):
        raise InvalidRequestError(f"max_generate_length must be an integer >= 1 or None (up to the KV cache's "
                                  f"capacity), got {request.max_generate_length!r}")
    if request.lora_weights_name is not None and not isinstance(request.lora_weights_name, str):
        raise InvalidRequestError("lora_weights_name must be a string or None")
    if request.logprobs is not None and (not _is_int(request.logprobs) or not 0 <= request.logprobs <= 20):
        raise InvalidRequestError(f"logprobs must be None or the alternatives per token, 0-20, got {request.logprobs!r}")
    if request.ignore_eos not in (True, False):
        raise InvalidRequestError(f"ignore_eos must be True or False, got {request.ignore_eos!r}")
    if request.speculative not in (None, True, False):
        raise InvalidRequestError(f"speculative must be True, False or None, got {request.speculative!r}")
    return [normalize_item(item, i) for i, item in enumerate(request.requests)]
