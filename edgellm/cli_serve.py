"""`edgellm serve`: the HTTP server's options, and the runtime it serves built from the model options."""

from __future__ import annotations

import os

from .errors import EdgeLLMError


def add_serve_options(p) -> None:
    p.add_argument("model_dir_given", nargs="?", default=None, metavar="MODEL", help="the same as --model-dir")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                      "0.0.0.0 serves every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY"),
                   help="require this key on /v1/ (Authorization: Bearer KEY or x-api-key; default: $EDGELLM_API_KEY, "
                        "else none)")
    g.add_argument("--served-model-name", default=None,
                   help="the base model's id in /v1/models and requests (default: the model directory's name)")
    g.add_argument("--allow-lora-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    g.add_argument("--max-queued", type=int, default=None,
                   help="sequences that may wait for a KV slot; past it requests get 429 (default: no bound)")
    g.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens prefilled per engine step beside the decoding rows (default 384)")
    g.add_argument("--max-request-mb", type=float, default=32, help="largest request body in MB (default 32)")
    g.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds Ctrl-C / SIGTERM waits for requests in flight before exiting (default 30)")
    g.add_argument("--no-capture-graphs", action="store_true",
                   help="capture CUDA graphs on first use instead of at start-up (faster start, slower first requests)")
    g.add_argument("--gil-switch-interval", type=float, default=0.25, metavar="MS",
                   help="how long a Python thread waiting for the interpreter lock waits before the one holding it "
                        "must hand it over (sys.setswitchinterval): short, so the engine loop's step launches and "
                        "the event loop's streamed chunks interleave (default 0.25 ms; Python's own is 5)")
    g.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info: one line per request)")


def cmd_serve(args, runtime_from_args) -> int:
    try:
        from .server import ServerSettings, serve
    except ImportError as exc:
        raise EdgeLLMError(f"edgellm serve needs the serve extra ({exc.name} is missing): "
                           "pip install 'edgellm[serve]'") from None
    for name, value in (("--port", args.port), ("--max-request-mb", args.max_request_mb),
                        ("--gil-switch-interval", args.gil_switch_interval)):
        if not value or value < 0:
            raise EdgeLLMError(f"{name} must be positive, got {value}")
    settings = ServerSettings(model_name=args.served_model_name, api_key=args.api_key or None,
                              allow_lora_loading=args.allow_lora_loading,
                              max_request_bytes=int(args.max_request_mb * (1 << 20)))

    def load():
        runtime = runtime_from_args(args, max_queued=args.max_queued, prefill_budget=args.prefill_budget)
        if not args.no_capture_graphs:
            runtime.capture_graphs(lora=bool(runtime.get_available_lora_weights()))
        return runtime

    print(f"edgellm serve: loading the model; listening on {args.host}:{args.port} (GET /health says when it is "
          "ready)", flush=True)
    return serve(load, settings, host=args.host, port=args.port, drain_seconds=args.drain_timeout,
                 log_level=args.log_level, switch_interval_ms=args.gil_switch_interval)
