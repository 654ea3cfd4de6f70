"""The Anthropic Messages API (/v1/messages): its body turned into an LLMGenerationRequest (a Job of
openai_api's shape, one item), its response and its stream's events written as Anthropic writes them."""

from __future__ import annotations

import json
import uuid

from ..errors import InvalidRequestError
from ..requests import LLMGenerationRequest, LLMGenerationResponse
from ..tool_calls import functions_of, parse_tool_calls
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
    converted = _system(body.raw("system")) + [m for i, one in enumerate(messages) for m in _messages(one, i)]
    if body.raw("thinking"):
        raise invalid("thinking: not supported by this server yet", "thinking")
    tools, functions, choice = _tools(body.raw("tools"), body.raw("tool_choice"))
    settings = sampling(body, defaults, temperature_high=1.0)
    stop = body.strings("stop_sequences", most=16)
    stream = body.boolean("stream")
    body.unknown()
    item = {"messages": converted, **({"tools": tools} if tools else {})}
    request = LLMGenerationRequest(requests=[item], max_generate_length=max_tokens, stop=stop,
                                   lora_weights_name=adapter, **settings)
    job = Job(request, model, 1, stream, False, f"msg_{uuid.uuid4().hex}")
    job.functions, job.tool_choice = functions, choice
    return job


def _tools(tools, choice) -> tuple[list | None, dict | None, str | dict]:
    """Anthropic's tools ({name, description, input_schema}) as OpenAI function definitions (what chat
    templates take), their schemas by name, and tool_choice in OpenAI's terms (auto, any -> required,
    tool -> a named function, none)."""
    if not tools:
        if choice:
            raise invalid("tool_choice: needs tools", "tool_choice")
        return None, None, "auto"
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise invalid("tools: a list of {name, description, input_schema}", "tools")
    converted = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema", {"type": "object"})}}
                 for t in tools]
    try:
        functions = functions_of(converted)
    except InvalidRequestError as exc:
        raise invalid(f"tools: {exc}", "tools") from None
    kind = choice.get("type", "auto") if isinstance(choice, dict) else choice or "auto"
    if kind == "tool":
        name = choice.get("name")
        if name not in functions:
            raise invalid(f"tool_choice.name: {name!r} is not among the tools", "tool_choice")
        return converted, functions, {"type": "function", "function": {"name": name}}
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise invalid('tool_choice.type: one of "auto", "any", "tool", "none"', "tool_choice")
    return converted, functions, mapped


def _system(system) -> list[dict]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" and
                                        isinstance(b.get("text"), str) for b in system):
        return [{"role": "system", "content": "".join(b["text"] for b in system)}]
    raise invalid("system: must be a string or a list of text blocks", "system")


def _messages(message, index: int) -> list[dict]:
    """A message as chat-template messages: tool_use blocks become the assistant's tool_calls, a user's
    tool_result blocks become tool messages (before the rest of the turn)."""
    where = f"messages.{index}"
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return [_message(message, index)]
    calls = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    rest = [b for b in content if b not in calls and b not in results]
    out = []
    for j, block in enumerate(results):
        if message.get("role") != "user":
            raise invalid(f"{where}.content: tool_result blocks go in user messages", "messages")
        out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")),
                    "content": _result_text(block.get("content"), f"{where}.content.{j}")})
    if calls:
        if message.get("role") != "assistant":
            raise invalid(f"{where}.content: tool_use blocks go in assistant messages", "messages")
        text = _message({"role": "assistant", "content": rest}, index)["content"] if rest else ""
        out.append({"role": "assistant", "content": text, "tool_calls": [
            {"id": b.get("id"), "type": "function",
             "function": {"name": b.get("name"), "arguments": b.get("input", {})}} for b in calls]})
    elif rest:
        out.append(_message({**message, "content": rest}, index))
    return out


def _result_text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(b.get("text", "") for b in content)
    raise invalid(f"{where}.content: a string or text blocks", "messages")


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


def content_blocks(job: Job, response: LLMGenerationResponse) -> tuple[list[dict], str]:
    """The answer's content blocks (its text; tool_use blocks where the request offered tools and the
    model called them) and its stop reason."""
    stop = response.stop_sequences[0]
    text, reason = response.output_texts[0], stop_reason(response.finish_reasons[0], stop)
    if job.parses_tools:
        rest, calls = parse_tool_calls(text, job.tool_format)
        if calls:
            blocks = [{"type": "text", "text": rest}] if rest else []
            return blocks + [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                              "input": json.loads(call.arguments)} for call in calls], "tool_use"
    return [{"type": "text", "text": text}], reason


def message_response(job: Job, response: LLMGenerationResponse) -> dict:
    stop = response.stop_sequences[0]
    blocks, reason = content_blocks(job, response)
    return {"id": job.id, "type": "message", "role": "assistant", "model": job.model, "content": blocks,
            "stop_reason": reason, "stop_sequence": stop,
            "usage": {"input_tokens": response.prompt_lengths[0], "output_tokens": len(response.output_ids[0])}}


class StreamedBlocks:
    """A streamed answer that may call tools, as Anthropic streams one: ToolCallStream events become
    content blocks (text; tool_use, its input's JSON in input_json_delta pieces), each stopped when the
    next starts."""

    def __init__(self):
        self.index, self.kind = -1, None

    def events(self, events: list[tuple]) -> list[dict]:
        out = []
        for event in events:
            if event[0] == "text":
                if self.kind != "text":
                    out += self._start({"type": "text", "text": ""})
                out.append({"type": "content_block_delta", "index": self.index,
                            "delta": {"type": "text_delta", "text": event[1]}})
            elif event[0] == "call":
                out += self._start({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": event[2],
                                    "input": {}})
            else:
                out.append({"type": "content_block_delta", "index": self.index,
                            "delta": {"type": "input_json_delta", "partial_json": event[2]}})
        return out

    def end(self, response: LLMGenerationResponse, called: bool) -> list[dict]:
        """The last block's stop (an empty text block where none began), the message's delta and stop."""
        out = self._start({"type": "text", "text": ""}) if self.kind is None else []
        return out + message_end(response, self.index, "tool_use" if called else None)

    def _start(self, block: dict) -> list[dict]:
        out = [{"type": "content_block_stop", "index": self.index}] if self.kind is not None else []
        self.index += 1
        self.kind = block["type"]
        return out + [{"type": "content_block_start", "index": self.index, "content_block": block}]


def message_start(job: Job, prompt_tokens: int) -> dict:
    return {"type": "message_start",
            "message": {"id": job.id, "type": "message", "role": "assistant", "model": job.model, "content": [],
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}


def text_delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def message_end(response: LLMGenerationResponse, index: int = 0, reason: str | None = None) -> list[dict]:
    """The events after the last delta: block `index`'s stop, the message's delta with its stop reason
    (default: the response's) and usage, and message_stop."""
    stop = response.stop_sequences[0]
    return [{"type": "content_block_stop", "index": index},
            {"type": "message_delta", "delta": {"stop_reason": reason or stop_reason(response.finish_reasons[0], stop),
                                                "stop_sequence": stop},
             "usage": {"output_tokens": len(response.output_ids[0])}},
            {"type": "message_stop"}]
