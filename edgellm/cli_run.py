"""`edgellm run`: a JSON file of requests in, a JSON document of responses out (format: README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import EdgeLLMError


_RUN_SETTINGS = ("max_generate_length", "temperature", "top_k", "top_p", "seed", "stop", "lora_weights_name",
                 "speculative", "response_format")


def run_batch_file(runtime, spec: dict) -> dict:
    """Execute the JSON batch format of `edgellm run` (see README); returns the output document. An
    item may set its own _RUN_SETTINGS over the file's; consecutive items with the same settings run
    as one request of up to batch_size items. A request that fails is retried item by item, so
    one bad item fails alone; errors name the item's index in the file."""
    from .progress import progress

    if not isinstance(spec, dict) or not isinstance(spec.get("requests"), list):
        raise EdgeLLMError('input JSON must be an object with a "requests" list')
    defaults = {k: spec[k] for k in _RUN_SETTINGS if k in spec}
    batch_size = spec.get("batch_size") or runtime.config.max_supported_batch_size
    groups: list[tuple[int, dict, list]] = []  # (index of the first item, settings, items)
    for index, item in enumerate(spec["requests"]):
        own = {k: item[k] for k in _RUN_SETTINGS if k in item} if isinstance(item, dict) else {}
        item = {k: v for k, v in item.items() if k not in own} if own else item
        settings = {**defaults, **own}
        if groups and groups[-1][1] == settings and len(groups[-1][2]) < batch_size:
            groups[-1][2].append(item)
        else:
            groups.append((index, settings, [item]))
    responses, batches = [], []
    for start, settings, chunk in progress(groups, desc="edgellm run", unit="batch"):
        responses += _run_group(runtime, start, settings, chunk, batches)
    return {"responses": sorted(responses, key=lambda r: r["request_index"]), "batches": batches}


def _run_group(runtime, start: int, settings: dict, chunk: list, batches: list) -> list[dict]:
    """The responses of items start .. of one request (its batch document appended to `batches`)."""
    import re

    from .requests import LLMGenerationRequest

    try:
        response = runtime.handle_request(LLMGenerationRequest(requests=chunk, **settings))
    except EdgeLLMError as exc:
        if len(chunk) > 1:  # find the item(s) at fault
            return [r for i, item in enumerate(chunk)
                    for r in _run_group(runtime, start + i, settings, [item], batches)]
        error = re.sub(r"request item \d+", f"request {start}", str(exc))
        batches.append({"first_request": start, "size": 1, "error": error})
        return [{"request_index": start, "error": error}]
    document = response.to_dict()
    batches.append({"first_request": start, "size": len(chunk), **document["timings"],
                    **{key: document[key] for key in ("kv_reuse", "speculative") if key in document}})
    return [{"request_index": start + i, "output_text": response.output_texts[i], "output_ids": response.output_ids[i],
             "finish_reason": response.finish_reasons[i], "prompt_length": response.prompt_lengths[i]}
            for i in range(len(chunk))]


def cmd_run(args) -> int:
    try:
        spec = json.loads(sys.stdin.read() if args.input == "-" else Path(args.input).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    from .cli import _runtime  # (cli.py imports this module)

    runtime = _runtime(args)
    result = run_batch_file(runtime, spec)
    runtime.close()  # pending KV-store disk writes
    document = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if args.output == "-":
        sys.stdout.write(document)
    else:
        Path(args.output).write_text(document)
    failed = sum("error" in r for r in result["responses"])
    print(f"wrote {len(result['responses'])} responses to {'stdout' if args.output == '-' else args.output}"
          + (f" ({failed} failed)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
