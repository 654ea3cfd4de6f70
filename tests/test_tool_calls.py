"""edgellm/tool_calls.py: the formats read from chat templates, calls parsed out of each format (text
that is not a well-formed call stays text), tool definitions checked, and the constraint of a required
call compiled and holding the model to it (tests/server/test_tool_calls_server.py runs it end to end)."""

import json

import pytest

from edgellm.errors import InvalidRequestError
from edgellm.tool_calls import (ToolCall, call_constraint, functions_of, generic_tool_messages, parse_tool_calls,
                                tool_call_format)

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_formats_from_templates():
    assert tool_call_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tool_call_format("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert tool_call_format("{% if tools %}<|python_tag|> parameters{% endif %}") == "llama"
    assert tool_call_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "hermes"  # (generic messages)


@pytest.mark.parametrize("fmt, text, content, calls", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "Let me check.", [ToolCall("weather", '{"city": "Oslo"}')]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": '
     '{"x": 1}}</tool_call>', "", [ToolCall("a", "{}"), ToolCall("b", '{"x": 1}')]),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama", '<|python_tag|>{"name": "weather", "parameters": {"city": "Rome"}}', "",
     [ToolCall("weather", '{"city": "Rome"}')]),
    ("llama", "The weather is fine.", "The weather is fine.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Lima"}}]', "",
     [ToolCall("weather", '{"city": "Lima"}')]),
    ("mistral", "[TOOL_CALLS] [{broken", "[TOOL_CALLS] [{broken", []),
])
def test_parse_tool_calls(fmt, text, content, calls):
    assert parse_tool_calls(text, fmt) == (content, calls)


def test_tool_definitions_are_checked():
    assert functions_of([WEATHER]) == {"weather": WEATHER["function"]["parameters"]}
    for bad in ([], [{"type": "function"}], [{"type": "code", "function": {"name": "x"}}], "weather"):
        with pytest.raises(InvalidRequestError):
            functions_of(bad)
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        call_constraint("hermes", functions_of([WEATHER]), "nope")


def test_required_call_constraint_is_one_call_of_an_offered_function():
    spec = call_constraint("hermes", functions_of([WEATHER, {"type": "function", "function": {"name": "time"}}]))
    parts = json.loads(spec.source)
    assert spec.kind == "tagged_json" and parts["prefix"] == "<tool_call>\n" and parts["suffix"] == "\n</tool_call>"
    assert [o["properties"]["name"]["const"] for o in parts["schema"]["anyOf"]] == ["weather", "time"]
    llama = json.loads(call_constraint("llama", functions_of([WEATHER]), "weather").source)
    assert llama["schema"]["required"] == ["name", "parameters"] and llama["prefix"] == ""


def test_generic_tool_messages_for_a_template_without_tools():
    """The tools and the call convention go into the system turn; earlier calls and results become text."""
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "4 C"}]
    out = generic_tool_messages(history, [WEATHER])
    assert out[0]["role"] == "system" and '"name": "weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n4 C\n</tool_response>"}
    assert parse_tool_calls(out[2]["content"], "hermes")[1] == [ToolCall("weather", '{"city": "Oslo"}')]
    kept = generic_tool_messages([{"role": "system", "content": "Be brief."}] + history[:1], [WEATHER])
    assert kept[0]["content"].startswith("Be brief.\n\n") and len(kept) == 2
