"""Tool calls in a model's own format: which format its chat template teaches (tool_call_format), the
calls parsed out of what it wrote (parse_tool_calls), and the constraint that makes it write one call of
the tools offered, its arguments valid under the function's JSON schema (call_constraint: tool_choice
"required" or a named function). A template that renders no tools gets them in Hermes' manner instead
(generic_tool_messages: a system turn listing them, earlier calls and results written out as text).

Formats: "hermes" (Qwen2.5 / Qwen3 / Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one
block per call), "llama" (Llama 3.1-3.2: a JSON object {"name": ..., "parameters": {...}}, after
<|python_tag|> or alone), "mistral" ([TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]).
"""

from __future__ import annotations

import dataclasses
import json
import re

from .errors import InvalidRequestError
from .grammar import GrammarSpec

FORMATS = ("hermes", "llama", "mistral")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text (OpenAI's function.arguments)


def renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tool_call_format(chat_template: str | None) -> str:
    """The format a chat template asks tool calls in (hermes where it renders no tools: generic_tool_messages)."""
    if not renders_tools(chat_template):
        return "hermes"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "parameters" in chat_template and ("<|python_tag|>" in chat_template or "ipython" in chat_template):
        return "llama"
    return "hermes"  # (the common default of open models' templates)


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(the text outside the calls, the calls) of a model's output; text that is not a well-formed call
    stays text."""
    if fmt == "hermes":
        calls, rest = [], text
        for block in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            call = _call(block.group(1), "arguments")
            if call is not None:
                calls.append(call)
                rest = rest.replace(block.group(0), "", 1)
        return rest.strip() if calls else text, calls
    if fmt == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        try:
            listed = json.loads(tail.strip())
        except ValueError:
            return text, []
        listed = listed if isinstance(listed, list) else [listed]
        calls = [c for c in (_call(json.dumps(item), "arguments") for item in listed) if c is not None]
        return (head.strip(), calls) if calls and len(calls) == len(listed) else (text, [])
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls = []
    for part in body.split(";") if body.startswith("{") else []:
        call = _call(part, "parameters") or _call(part, "arguments")
        if call is None:
            return text, []
        calls.append(call)
    return ("", calls) if calls else (text, [])


def generic_tool_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template that renders no tools: the tools and how to call them in the system turn
    (Hermes' <tools> and <tool_call> conventions), an assistant's earlier calls as <tool_call> text, tool
    results as <tool_response> user turns."""
    listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    preamble = ("You can call functions. Their signatures are in <tools></tools>:\n<tools>\n" + listed +
                "\n</tools>\nTo call one, answer with <tool_call>\n{\"name\": <function name>, \"arguments\": "
                "<arguments object>}\n</tool_call>")
    out = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"].get("arguments", {})},
                                                         ensure_ascii=False) + "\n</tool_call>"
                            for c in message["tool_calls"])
            out.append({"role": "assistant", "content": content + calls})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
    if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + preamble}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out


def _call(source: str, key: str) -> ToolCall | None:
    try:
        value = json.loads(source)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or \
            not isinstance(value.get(key, {}), dict):
        return None
    return ToolCall(value["name"], json.dumps(value.get(key, {}), ensure_ascii=False))


def functions_of(tools) -> dict[str, dict]:
    """OpenAI tool definitions -> {name: parameters schema}; InvalidRequestError for a malformed one."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                      "\"parameters\": {...}}}}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[function["name"]] = parameters
    return out


def call_constraint(fmt: str, functions: dict[str, dict], name: str | None = None) -> GrammarSpec:
    """One call in `fmt` of `name` (or of any of `functions`), its arguments valid under the schema."""
    if name is not None and name not in functions:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools")
    key = "parameters" if fmt == "llama" else "arguments"
    options = [{"type": "object", "properties": {"name": {"const": n}, key: schema}, "required": ["name", key],
                "additionalProperties": False} for n, schema in functions.items() if name in (None, n)]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    prefix, suffix = {"hermes": ("<tool_call>\n", "\n</tool_call>"), "mistral": ("[TOOL_CALLS] [", "]"),
                      "llama": ("", "")}[fmt]
    return GrammarSpec("tagged_json", json.dumps({"prefix": prefix, "schema": schema, "suffix": suffix}))
