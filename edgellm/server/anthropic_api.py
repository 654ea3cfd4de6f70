"""The Anthropic Messages API (/v1/messages): its body turned into an LLMGenerationRequest (a Job of
openai_api's shape, one item), its response and its stream's events written as Anthropic writes them."""

from __future__ import annotations

import uuid

from ..requests import LLMGenerationRequest, LLMGenerationResponse
from .errors import invalid
from .openai_api import Job
from .params import Body, base64_bytes, message_of, model_adapter, sampling

_IGNORED = ("metadata", "service_tier", "cache_control")  # (bookkeeping: no effect on the output)
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def parse_messages(raw, defaults: dict, models: dict) -> Job:
    body = Body(raw, _IGNORED)
    model, adapter = model_adapter(body.raw("model"), models)
    max_tokens = body.integer("max_tokens", low=1)
    if max_tokens is None:
        raise invalid("max_tokens: field required", "max_tokens")
    messages = body.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: a non-empty list is required", "messages")
    converted = _system(body.raw("system")) + [_message(m, i) for i, m in enumerate(messages)]
    for name in ("tools", "tool_choice", "thinking"):
        if body.raw(name):
            raise invalid(f"{name}: not supported by this server yet", name)
    settings = sampling(body, defaults, temperature_high=1.0)
    stop = body.strings("stop_sequences", most=16)
    stream = body.boolean("stream")
    body.unknown()
    request = LLMGenerationRequest(requests=[{"messages": converted}], max_generate_length=max_tokens, stop=stop,
                                   lora_weights_name=adapter, **settings)
    return Job(request, model, 1, stream, False, f"msg_{uuid.uuid4().hex}")


def _system(system) -> list[dict]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" and
                                        isinstance(b.get("text"), str) for b in system):
        return [{"role": "system", "content": "".join(b["text"] for b in system)}]
    raise invalid("system: must be a string or a list of text blocks", "system")


def _message(message, index: int) -> dict:
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise invalid(f"{where}: each message needs a role of user or assistant and a content", "messages")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not content:
        raise invalid(f"{where}.content: a string or a non-empty list of content blocks", "messages")
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "image", "image": _image(block.get("source"), f"{where}.content.{j}")})
        else:
            raise invalid(f"{where}.content.{j}: text blocks (and image blocks in user messages) are supported",
                          "messages")
    return message_of(role, parts)


def _image(source, where: str) -> bytes:
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise invalid(f"{where}.source: only base64 image sources are accepted; the server does not fetch URLs",
                      "messages")
    if source.get("media_type") not in _IMAGE_TYPES:
        raise invalid(f"{where}.source.media_type: one of {', '.join(_IMAGE_TYPES)}", "messages")
    return base64_bytes(source.get("data"), f"{where}.source.data")


def stop_reason(reason: str, stop_sequence: str | None) -> str:
    if reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def message_response(job: Job, response: LLMGenerationResponse) -> dict:
    stop = response.stop_sequences[0]
    return {"id": job.id, "type": "message", "role": "assistant", "model": job.model,
            "content": [{"type": "text", "text": response.output_texts[0]}],
            "stop_reason": stop_reason(response.finish_reasons[0], stop), "stop_sequence": stop,
            "usage": {"input_tokens": response.prompt_lengths[0], "output_tokens": len(response.output_ids[0])}}


def message_start(job: Job, prompt_tokens: int) -> dict:
    return {"type": "message_start",
            "message": {"id": job.id, "type": "message", "role": "assistant", "model": job.model, "content": [],
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}


def text_delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def message_end(response: LLMGenerationResponse) -> list[dict]:
    """The events after the last text delta: the block's stop, the message's delta with its stop
    reason and usage, and message_stop."""
    stop = response.stop_sequences[0]
    return [{"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": stop_reason(response.finish_reasons[0], stop),
                                                "stop_sequence": stop},
             "usage": {"output_tokens": len(response.output_ids[0])}},
            {"type": "message_stop"}]
