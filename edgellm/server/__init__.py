"""`edgellm serve`: OpenAI- and Anthropic-compatible HTTP on the runtime's engine loop (the [serve] extra:
FastAPI, uvicorn, prometheus-client). app.py holds the endpoints, openai_api.py / anthropic_api.py the
two APIs' shapes, params.py the shared field checks, errors.py the error bodies, metrics.py /metrics,
run.py the uvicorn process with its drain."""

from .app import ServerSettings, ServerState, create_app
from .run import serve, server

__all__ = ["ServerSettings", "ServerState", "create_app", "serve", "server"]
