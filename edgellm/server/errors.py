"""HTTP errors in each API's own shape: ApiError carries the status and message; openai_body and
anthropic_body write it as OpenAI and Anthropic clients parse it. from_edgellm maps the runtime's
exceptions (edgellm.errors) to statuses; nothing else about an exception reaches a client."""

from __future__ import annotations

import logging

from ..errors import (EdgeLLMError, GrammarError, InvalidRequestError, LoraError, QueueFullError,
                      RequestCancelledError, TokenizerError)

log = logging.getLogger("edgellm.server")

# OpenAI's error `type` and Anthropic's by status.
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 499: "cancelled", 500: "internal_error", 503: "service_unavailable"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 499: "cancelled",
                    500: "api_error", 503: "overloaded_error"}


class ApiError(Exception):
    """An error answered as `status` with `message`; `param` names the request field at fault (OpenAI's
    error.param), `code` is OpenAI's error.code, `headers` go on the response (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def openai_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "invalid_request_error"),
                      "param": error.param, "code": error.code}}


def anthropic_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(error.status, "api_error"),
                                       "message": error.message}}


def from_edgellm(exc: Exception, retry_after: int = 1) -> ApiError:
    """The ApiError a runtime exception becomes. Errors edgellm raises on purpose keep their message
    (they describe the request, not the server); any other is logged with its traceback and answered
    as a bare 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, GrammarError):
        return ApiError(400, str(exc), param="response_format")
    if isinstance(exc, (InvalidRequestError, LoraError, TokenizerError)):
        return ApiError(400, str(exc))
    if isinstance(exc, RequestCancelledError):
        return ApiError(499, str(exc))
    if isinstance(exc, EdgeLLMError):
        return ApiError(500, str(exc))
    log.exception("request failed", exc_info=exc)
    return ApiError(500, "the server failed to generate this response (see its log)")
