"""The OpenAI API's requests and responses: /v1/chat/completions and /v1/completions bodies turned
into an LLMGenerationRequest (a Job), and responses, stream chunks and usage written as OpenAI writes
them. No I/O here: app.py runs the jobs."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from ..errors import InvalidRequestError
from ..requests import LLMGenerationRequest, LLMGenerationResponse
from ..tool_calls import functions_of, parse_tool_calls
from .errors import invalid
from .params import Body, data_uri_bytes, message_of, model_adapter, processing, sampling, structured

# Accepted and without effect on the output (OpenAI bookkeeping fields).
_IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "stream_options")
_MAX_N = 16
# (as LLMGenerationRequest names them)
_REQUEST_FIELDS = ("temperature", "top_k", "top_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p", "logit_bias", "logprobs", "response_format")


@dataclasses.dataclass
class Job:
    """A parsed request: what runs (`request`, its items `n` per prompt) and how it is answered."""
    request: LLMGenerationRequest
    model: str
    n: int
    stream: bool
    include_usage: bool
    id: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    functions: dict | None = None  # the tools offered: name -> parameters schema (None: no tools)
    tool_choice: str | dict = "auto"  # "auto", "none", "required" or {"type": "function", "function": {"name"}}
    tool_format: str | None = None  # the model's tool-call format (tool_calls.py), set when it is served

    @property
    def parses_tools(self) -> bool:
        return self.functions is not None and self.tool_choice != "none" and self.tool_format is not None


def _common(body: Body, defaults: dict, models: dict, logprobs: int | None) -> dict:
    """The fields chat and completions share, as keyword arguments of Job and LLMGenerationRequest."""
    model, adapter = model_adapter(body.raw("model"), models)
    n = body.integer("n", 1, low=1, high=_MAX_N)
    stream = body.boolean("stream")
    options = body.obj("stream_options")
    if options and not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be true or false", "stream_options")
    settings = {**sampling(body, defaults), **processing(body), **structured(body), "logprobs": logprobs}
    stop = body.strings("stop", most=4)
    ignore_eos = body.boolean("ignore_eos")  # (an extra, as vLLM's: the stop token ids do not end the answer)
    return {"model": model, "adapter": adapter, "n": n, "stream": stream, "include_usage": include_usage,
            "stop": stop, "ignore_eos": ignore_eos, **settings}


def _job(items: list[dict], fields: dict, max_tokens, prefix: str) -> Job:
    n = fields["n"]
    request = LLMGenerationRequest(
        requests=[item for item in items for _ in range(n)], max_generate_length=max_tokens,
        stop=fields["stop"], lora_weights_name=fields["adapter"], ignore_eos=fields["ignore_eos"],
        **{name: fields[name] for name in _REQUEST_FIELDS})
    return Job(request, fields["model"], n, fields["stream"], fields["include_usage"], f"{prefix}-{uuid.uuid4().hex}")


def parse_chat(raw, defaults: dict, models: dict) -> Job:
    body = Body(raw, _IGNORED)
    messages = body.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    converted = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = body.integer("max_completion_tokens", low=1)
    legacy = body.integer("max_tokens", low=1)
    if body.raw("functions"):
        raise invalid("functions (deprecated by OpenAI) is not supported; send tools", "functions")
    tools, choice = body.raw("tools"), body.raw("tool_choice")
    functions = None
    if tools:
        try:
            functions = functions_of(tools)
        except InvalidRequestError as exc:
            raise invalid(str(exc), "tools") from None
    named = isinstance(choice, dict) and choice.get("type") == "function" and \
        isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if choice is not None and choice not in ("auto", "none", "required") and not named:
        raise invalid('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                      '{"name": ...}}', "tool_choice")
    if choice not in (None, "auto", "none") and functions is None:
        raise invalid("tool_choice needs tools", "tool_choice")
    if named and choice["function"]["name"] not in functions:
        raise invalid(f"tool_choice names {choice['function']['name']!r}, which is not among the tools", "tool_choice")
    wanted = body.boolean("logprobs")
    top = body.integer("top_logprobs", low=0, high=20)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    fields = _common(body, defaults, models, (top or 0) if wanted else None)
    body.unknown()
    if functions is not None and choice not in (None, "auto", "none") and fields["response_format"] is not None:
        raise invalid("response_format and a required tool call cannot both constrain the answer", "response_format")
    item = {"messages": converted, **({"tools": tools} if functions is not None else {})}
    job = _job([item], fields, max_tokens or legacy, "chatcmpl")
    job.functions, job.tool_choice = functions, choice or "auto"
    return job


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where} must be an object with role and content", "messages")
    role, content = message.get("role"), message.get("content")
    if role == "developer":  # (OpenAI's newer name for the system role)
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise invalid(f"{where}.role must be system, developer, user, assistant or tool, got {role!r}", "messages")
    extra = {}
    if message.get("tool_calls") is not None:
        if role != "assistant" or not isinstance(message["tool_calls"], list):
            raise invalid(f"{where}.tool_calls: a list, on assistant messages", "messages")
        extra["tool_calls"] = [_earlier_call(call, f"{where}.tool_calls[{j}]")
                               for j, call in enumerate(message["tool_calls"])]
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        extra["tool_call_id"] = message["tool_call_id"]
    if extra and isinstance(content, (str, type(None))):
        return {"role": role, "content": content or "", **extra}
    if isinstance(content, str):
        return {"role": role, "content": content}
    if content is None and role == "assistant":
        return {"role": role, "content": ""}
    if not isinstance(content, list) or not content:
        raise invalid(f"{where}.content must be a string or a non-empty list of parts", "messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append({"type": "image", "image": data_uri_bytes(url, f"{where}.content[{j}].image_url")})
        else:
            raise invalid(f"{where}.content[{j}] must be a text part or an image_url part", "messages")
    if role != "user" and any(p["type"] == "image" for p in parts):
        raise invalid(f"{where}: images go in user messages", "messages")
    return message_of(role, parts)


def _earlier_call(call, where: str) -> dict:
    """An assistant's earlier tool call as chat templates take it: the arguments as an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                      "messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise invalid(f"{where}.function.arguments is not JSON", "messages") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def tool_stream_deltas(events: list[tuple]) -> list[dict]:
    """ToolCallStream events as chat chunk deltas, as OpenAI streams calls: a call's first delta has its
    index, id, type and name (arguments ""), the next ones pieces of its arguments."""
    out = []
    for event in events:
        if event[0] == "text":
            out.append({"content": event[1]})
        elif event[0] == "call":
            out.append({"tool_calls": [{"index": event[1], "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                        "function": {"name": event[2], "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
    return out


def tool_call_entries(calls) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


def answer_message(job: Job, text: str, reason: str) -> tuple[dict, str]:
    """A choice's message and finish reason: its tool calls parsed out where the request offered tools."""
    if job.parses_tools:
        content, calls = parse_tool_calls(text, job.tool_format)
        if calls:
            return {"role": "assistant", "content": content or None, "tool_calls": tool_call_entries(calls)}, \
                "tool_calls"
    return {"role": "assistant", "content": text}, reason


def parse_completion(raw, defaults: dict, models: dict) -> Job:
    body = Body(raw, _IGNORED)
    prompt = body.raw("prompt")
    items = _prompts(prompt)
    max_tokens = body.integer("max_tokens", 16, low=1)  # (OpenAI's default for this endpoint)
    for name, neutral in (("echo", False), ("suffix", None), ("best_of", 1)):
        value = body.raw(name)
        if value is not None and value != neutral:
            raise invalid(f"{name} is not supported by this server yet", name)
    fields = _common(body, defaults, models, body.integer("logprobs", low=0, high=5))
    body.unknown()
    return _job(items, fields, max_tokens, "cmpl")


def _prompts(prompt) -> list[dict]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    def is_ids(value):
        return isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) and prompt:
        return [{"prompt": prompt}]
    if is_ids(prompt):
        return [{"input_ids": prompt}]
    if isinstance(prompt, list) and prompt:
        items = []
        for p in prompt:
            if isinstance(p, str) and p:
                items.append({"prompt": p})
            elif is_ids(p):
                items.append({"input_ids": p})
            else:
                raise invalid("prompt must be a non-empty string, a list of them, a list of token ids or a list of "
                              "such lists", "prompt")
        return items
    raise invalid("prompt must be a non-empty string, a list of them, a list of token ids or a list of such lists",
                  "prompt")


# ---------------------------------------------------------------------------- responses
def usage(job: Job, response: LLMGenerationResponse) -> dict:
    """Prompt tokens once per prompt (the n choices of one prompt share it), completion tokens of every choice."""
    prompt = sum(response.prompt_lengths[::job.n])
    completion = sum(len(ids) for ids in response.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries, text_of) -> dict:
    """OpenAI chat's choice.logprobs of TokenLogprobs; text_of(id): a token's text."""
    def one(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]}


def completion_logprobs(entries, text_of, offset: int = 0) -> dict:
    """The completions endpoint's choice.logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [text_of(e.token) for e in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text_of(t): v for t, v in e.top} for e in entries], "text_offset": offsets}


def chat_response(job: Job, response: LLMGenerationResponse, text_of=None) -> dict:
    lps = response.logprobs
    choices = []
    for i, (text, reason) in enumerate(zip(response.output_texts, response.finish_reasons)):
        message, reason = answer_message(job, text, reason)
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": chat_logprobs(lps[i], text_of) if lps is not None else None})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(job, response), "system_fingerprint": None}


def completion_response(job: Job, response: LLMGenerationResponse, text_of=None) -> dict:
    lps = response.logprobs
    choices = [{"index": i, "text": text,
                "logprobs": completion_logprobs(lps[i], text_of) if lps is not None else None, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(response.output_texts, response.finish_reasons))]
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(job, response), "system_fingerprint": None}


def chat_chunk(job: Job, index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            **({"usage": None} if job.include_usage else {})}


def completion_chunk(job: Job, index: int, text: str, finish_reason: str | None = None, logprobs=None) -> dict:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            **({"usage": None} if job.include_usage else {})}


class TextChunks:
    """The SSE line of a text-only chunk (chat_chunk's / completion_chunk's, JSON-encoded compactly) from
    a prefix and suffix rendered once per request: a stream's per-token cost is one json.dumps of its text."""

    def __init__(self, job: Job, chat: bool):
        head = json.dumps({"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": job.created, "model": job.model}, ensure_ascii=False, separators=(",", ":"))
        self._head = head[:-1] + ',"choices":[{"index":'
        self._field = ',"delta":{"content":' if chat else ',"text":'
        self._tail = ('}' if chat else '') + ',"logprobs":null,"finish_reason":null}]' + \
            (',"usage":null}' if job.include_usage else '}')

    def sse(self, index: int, text: str) -> str:
        return f"data: {self._head}{index}{self._field}{json.dumps(text, ensure_ascii=False)}{self._tail}\n\n"


def usage_chunk(job: Job, response: LLMGenerationResponse, chat: bool) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": job.created,
            "model": job.model, "choices": [], "usage": usage(job, response)}
