"""The HTTP app: OpenAI (/v1/chat/completions, /v1/completions, /v1/models) and Anthropic (/v1/messages)
endpoints on an LLMInferenceRuntime's submit(), plus /health, /metrics and run-time LoRA loading.

Each generation request: its body read under a size cap and parsed (openai_api.py, anthropic_api.py),
submitted (from a worker thread where it has images to decode and preprocess), then answered
whole or as server-sent events from the handle's deltas (RequestHandle.adeltas: no thread waits on the
engine). A client that goes away cancels its request, so its KV slot frees at the next engine step.
Every error is answered in its API's shape (errors.py); the runtime stays usable after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..multimodal import image_sources
from ..requests import GenerationItem
from ..tool_call_stream import ToolCallStream
from ..tool_calls import call_constraint, tool_call_format
from . import anthropic_api, openai_api
from .errors import ApiError, anthropic_body, from_edgellm, invalid, openai_body
from .metrics import ServerMetrics
from .params import Body

log = logging.getLogger("edgellm.server")


@dataclasses.dataclass
class ServerSettings:
    model_name: str | None = None        # the base model's id (default: its directory's name)
    api_key: str | None = None           # required as "Authorization: Bearer KEY" or "x-api-key: KEY" on /v1/
    allow_lora_loading: bool = False     # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_request_bytes: int = 32 << 20    # request bodies past this get 413 (images come as data: URIs)
    retry_after_s: int = 1               # the Retry-After of a 429 (queue full)


class ServerState:
    """What the handlers share: the runtime (None while it loads), the phase (loading, ready, draining,
    failed) and the generation requests in flight."""

    def __init__(self, settings: ServerSettings, runtime=None):
        self.settings = settings
        self.runtime = None
        self.phase = "loading"
        self.error: str | None = None
        self.in_flight = 0
        if runtime is not None:
            self.ready(runtime)

    def ready(self, runtime) -> None:
        self.runtime = runtime
        if self.settings.model_name is None:
            self.settings.model_name = runtime.model_dir.name
        self.phase = "ready"

    def models(self) -> dict[str, str]:
        """Model id -> adapter name ("" = the base model), the base model first."""
        names = {self.settings.model_name: ""}
        for name in self.runtime.get_available_lora_weights():
            if name:
                names.setdefault(name, name)
        return names

    def serving_runtime(self):
        if self.phase == "ready":
            return self.runtime
        if self.phase == "draining":
            raise ApiError(503, "the server is shutting down and takes no new requests")
        if self.phase == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}")
        raise ApiError(503, "the model is still loading; retry when GET /health says ready",
                       headers={"Retry-After": "5"})


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(lambda: state.runtime)

    if state.settings.api_key is not None:
        app.add_middleware(_ApiKeyCheck, key=state.settings.api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Routing errors (no such path, wrong method) in the API's error shape too."""
        shape = anthropic_body if request.url.path.startswith("/v1/messages") else openai_body
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(ApiError(exc.status_code, message), shape)

    @app.get("/health")
    async def health():
        stats = state.runtime.serving_stats() if state.runtime is not None else {"waiting": 0, "running": 0}
        body = {"status": state.phase, "waiting": stats["waiting"], "running": stats["running"],
                "in_flight_requests": state.in_flight}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.phase == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        try:
            runtime = state.serving_runtime()
        except ApiError as exc:
            return _error(exc, openai_body)
        base = state.settings.model_name
        capacity = runtime.config.max_kv_cache_capacity
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "edgellm", "root": base,
                 "parent": None if not adapter else base, "max_model_len": capacity}
                for name, adapter in state.models().items()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        try:
            state.serving_runtime()
            if model_id not in state.models():
                raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        except ApiError as exc:
            return _error(exc, openai_body)
        return next(m for m in (await models())["data"] if m["id"] == model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, "chat", openai_api.parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completions", openai_api.parse_completion)

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await _generate(request, "messages", anthropic_api.parse_messages)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        return await _lora(request, load=True)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        return await _lora(request, load=False)

    async def _lora(request: Request, load: bool):
        try:
            runtime = state.serving_runtime()
            if not state.settings.allow_lora_loading:
                raise ApiError(404, "loading and unloading adapters is off; start the server with --allow-lora-loading")
            body = Body(await _json(request, state.settings.max_request_bytes))
            name = body.string("lora_name")
            if not name:
                raise invalid("lora_name is required", "lora_name")
            if load:
                path = body.string("lora_path")
                if not path:
                    raise invalid("lora_path is required", "lora_path")
                body.unknown()
                if name in state.models():
                    raise invalid(f"a model or adapter named {name!r} is already loaded", "lora_name")
                await asyncio.to_thread(runtime.add_lora_weights, name, path)
                return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")
            body.raw("lora_int_id")  # (vLLM clients send it; names are what edgellm keys adapters by)
            body.unknown()
            if name not in state.models() or not state.models()[name]:
                raise ApiError(404, f"no adapter named {name!r} is loaded", param="lora_name")
            await asyncio.to_thread(runtime.remove_lora_weights, name)
            return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")
        except Exception as exc:  # noqa: BLE001 (every failure answered, none raised into the server)
            return _error(from_edgellm(exc), openai_body)

    async def _generate(request: Request, endpoint: str, parse: Callable):
        arrived = time.perf_counter()
        shape = anthropic_body if endpoint == "messages" else openai_body
        try:
            runtime = state.serving_runtime()
            raw = await _json(request, state.settings.max_request_bytes)
            job = parse(raw, runtime.generation_defaults, state.models())
            if getattr(job, "functions", None) is not None:
                _offer_tools(job, runtime)
            # Images are decoded and preprocessed on a worker thread; a text or token-id prompt is prepared
            # on the event loop (tokenizing takes less than the thread's two hops add to its TTFT).
            handle = await asyncio.to_thread(runtime.submit, job.request) if _has_images(job.request) \
                else runtime.submit(job.request)
        except Exception as exc:  # noqa: BLE001
            error = from_edgellm(exc, state.settings.retry_after_s)
            metrics.requests.labels(endpoint, str(error.status)).inc()
            return _error(error, shape)
        queued_ms = (time.perf_counter() - arrived) * 1e3
        _begin(state)
        if job.stream:
            events = _anthropic_events(job, handle) if endpoint == "messages" else \
                _openai_events(job, handle, endpoint == "chat", _token_text(runtime))
            stream = _finishing(events, handle, endpoint, queued_ms)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            response = await _result_unless_disconnected(request, handle)
        except Exception as exc:  # noqa: BLE001
            error = from_edgellm(exc)
            metrics.requests.labels(endpoint, str(error.status)).inc()
            return _error(error, shape)
        finally:
            _end(state)
        metrics.requests.labels(endpoint, "200").inc()
        metrics.finished(response, queued_ms)
        if endpoint == "messages":
            return JSONResponse(anthropic_api.message_response(job, response))
        build = openai_api.chat_response if endpoint == "chat" else openai_api.completion_response
        return JSONResponse(build(job, response, _token_text(runtime)))

    async def _finishing(events, handle, endpoint: str, queued_ms: float):
        """A stream's events, then its bookkeeping: metrics by how it ended; a stream the client left
        (the server cancels the generator) cancels its request."""
        status = "499"
        try:
            async for event in events:
                yield event
            status = "200"
            metrics.finished(handle.result(), queued_ms)
        except Exception as exc:  # noqa: BLE001 (the error goes to the client as the stream's last event)
            error = from_edgellm(exc)
            status = str(error.status)
            yield _sse_error(error, endpoint)
        finally:
            handle.cancel()  # (no effect once done)
            metrics.requests.labels(endpoint, status).inc()
            _end(state)

    return app


class _ApiKeyCheck:
    """ASGI middleware: /v1/ requests need the key ("Authorization: Bearer KEY" or "x-api-key: KEY",
    compared in constant time). Plain ASGI rather than @app.middleware("http"), whose wrapper passes
    every streamed chunk through a memory stream and a task switch."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/v1/") and not self._authorized(scope):
            shape = anthropic_body if path == "/v1/messages" else openai_body
            error = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
                             code="invalid_api_key")
            await _error(error, shape)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self.key)


def _offer_tools(job, runtime) -> None:
    """A chat request with tools: the model's call format noted (its answer is parsed for calls), and
    with tool_choice "required" or a named function, its answer constrained to one such call."""
    if runtime.tokenizer is None:
        raise invalid("this model has no tokenizer: chat requests with tools need its chat template", "tools")
    job.tool_format = tool_call_format(runtime.tokenizer.chat_template)
    choice = job.tool_choice
    if choice == "required" or isinstance(choice, dict):
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        job.request.response_format = call_constraint(job.tool_format, job.functions, name)


def _has_images(request) -> bool:
    return any(image_sources(GenerationItem(**item)) for item in request.requests)


def _begin(state: ServerState) -> None:
    state.in_flight += 1


def _end(state: ServerState) -> None:
    state.in_flight -= 1


def _error(error: ApiError, shape) -> JSONResponse:
    status = 400 if error.status == 499 else error.status  # (nobody reads a cancelled request's answer)
    return JSONResponse(shape(error), status_code=status, headers=error.headers)


async def _json(request: Request, cap: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise ApiError(413, f"the request body has {int(length)} bytes, more than this server's limit of {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"the request body is larger than this server's limit of {cap} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None


async def _result_unless_disconnected(request: Request, handle):
    """The handle's response; if the client disconnects first, the request is cancelled."""
    result = asyncio.ensure_future(handle.aresult())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        handle.cancel()
        result.cancel()
        raise ApiError(499, "the client disconnected")
    return result.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict, event: str | None = None) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n" if event else f"data: {text}\n\n"


def _sse_error(error: ApiError, endpoint: str) -> str:
    return _sse(anthropic_body(error), "error") if endpoint == "messages" else _sse(openai_body(error))


def _token_text(runtime) -> Callable[[int], str]:
    tokenizer = runtime.tokenizer
    return (lambda token: tokenizer.decode([token])) if tokenizer is not None else str


async def _openai_events(job, handle, chat: bool, text_of):
    """Chat: each choice's role chunk, its content deltas, its finish chunk; completions: text deltas
    and finish chunks; each with the logprobs of its tokens (where asked); then the usage chunk
    (stream_options.include_usage) and [DONE]."""
    choices = len(handle.prompt_lengths)
    offsets = [0] * choices  # (completions' text_offset)
    text_chunks = openai_api.TextChunks(job, chat)
    if chat:
        yield "".join(_sse(openai_api.chat_chunk(job, i, {"role": "assistant", "content": ""}))
                      for i in range(choices))
    if chat and job.parses_tools:  # (each choice's calls read as they are written: tool_call_stream.py)
        streams = [ToolCallStream(job.tool_format) for _ in range(choices)]
        async for pieces in handle.adeltas():
            out = []
            for item, text, reason, _ in _merged(pieces):
                stream = streams[item]
                out += [_sse(openai_api.chat_chunk(job, item, delta))
                        for delta in openai_api.tool_stream_deltas(stream.feed(text, final=reason is not None))]
                if reason is not None:
                    out.append(_sse(openai_api.chat_chunk(job, item, {}, "tool_calls" if stream.called else reason)))
            if out:
                yield "".join(out)
        if job.include_usage:
            yield _sse(openai_api.usage_chunk(job, handle.result(), chat))
        yield "data: [DONE]\n\n"
        return
    async for pieces in handle.adeltas():
        out = []  # (the chunks of one burst of deltas go out in one write)
        for item, text, reason, entries in _merged(pieces):
            logprobs = None
            if job.request.logprobs is not None and entries:
                logprobs = openai_api.chat_logprobs(entries, text_of) if chat else \
                    openai_api.completion_logprobs(entries, text_of, offsets[item])
            offsets[item] += len(text)
            if logprobs is not None:
                out.append(_sse(openai_api.chat_chunk(job, item, {"content": text}, None, logprobs) if chat
                                else openai_api.completion_chunk(job, item, text, None, logprobs)))
            elif text:
                out.append(text_chunks.sse(item, text))
            if reason is not None:
                out.append(_sse(openai_api.chat_chunk(job, item, {}, reason) if chat
                                else openai_api.completion_chunk(job, item, "", reason)))
        if out:
            yield "".join(out)
    if job.include_usage:
        yield _sse(openai_api.usage_chunk(job, handle.result(), chat))
    yield "data: [DONE]\n\n"


async def _anthropic_events(job, handle):
    yield _sse(anthropic_api.message_start(job, handle.prompt_lengths[0]), "message_start")
    if job.parses_tools:  # (its calls read as they are written: tool_call_stream.py)
        stream, blocks = ToolCallStream(job.tool_format), anthropic_api.StreamedBlocks()
        async for pieces in handle.adeltas():
            for _, text, reason, _ in _merged(pieces):
                for event in blocks.events(stream.feed(text, final=reason is not None)):
                    yield _sse(event, event["type"])
        for event in blocks.end(handle.result(), stream.called):
            yield _sse(event, event["type"])
        return
    yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
               "content_block_start")
    yield _sse({"type": "ping"}, "ping")
    async for pieces in handle.adeltas():
        for _, text, _, _ in _merged(pieces):
            if text:
                yield _sse(anthropic_api.text_delta(text), "content_block_delta")
    for event in anthropic_api.message_end(handle.result()):
        yield _sse(event, event["type"])


def _merged(pieces) -> list[tuple[int, str, str | None, list]]:
    """Consecutive deltas of one item joined: (item, text, finish reason or None, token logprobs)."""
    out: list[list] = []
    for piece in pieces:
        if out and out[-1][0] == piece.item and out[-1][2] is None:
            out[-1][1] += piece.text
            out[-1][2] = piece.finish_reason
            out[-1][3].extend(piece.logprobs)
        else:
            out.append([piece.item, piece.text, piece.finish_reason, list(piece.logprobs)])
    return [tuple(entry) for entry in out]
