"""ToolCallStream (edgellm/tool_call_stream.py) against the whole-text parse (tool_calls.parse_tool_calls):
for answers in each format (calls, text around them, text that only looks like a call, keys in another
order, malformed blocks), fed whole, a character at a time and in random pieces, the streamed content and
calls equal the parse's; a call's start comes as soon as its head is in, and its arguments stream."""

import json
import random

import pytest

from edgellm.tool_call_stream import ToolCallStream
from edgellm.tool_calls import parse_tool_calls

ARGS = '{"city": "Paris \\"centre\\"", "days": [1, {"x": "}"}], "unit": "c"}'
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "weather", "arguments": {ARGS}}}\n</tool_call>'),
    ("hermes", f'Let me check.\n<tool_call>\n{{"name": "weather", "arguments": {ARGS}}}\n</tool_call>\n'
               '<tool_call>{"name": "time", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "late_name"}</tool_call>'),  # (keys reversed: whole)
    ("hermes", "No call here, only text with < and { in it.\n"),
    ("hermes", "Text then <tool_call>not json</tool_call> after"),
    ("hermes", "Cut off <tool_"),
    ("mistral", f'[TOOL_CALLS] [{{"name": "weather", "arguments": {ARGS}}}, {{"name": "time", "arguments": {{}}}}]'),
    ("mistral", "Plain [answer] without calls"),
    ("llama", f'<|python_tag|>{{"name": "weather", "parameters": {ARGS}}}'),
    ("llama", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'),
    ("llama", '{"answer": 42}'),  # (JSON that is no call: content)
    ("llama", "  Hello there, no tools needed."),
]


def _pieces(text: str, how: str) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    rng, out, at = random.Random(len(text)), [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        out.append(text[at:at + step])
        at += step
    return out


def _streamed(fmt: str, pieces: list[str]):
    stream, events = ToolCallStream(fmt), []
    for piece in pieces:
        events += stream.feed(piece)
    events += stream.finish()
    content = "".join(e[1] for e in events if e[0] == "text")
    calls: dict[int, list] = {}
    for e in events:
        if e[0] == "call":
            assert e[1] == len(calls)
            calls[e[1]] = [e[2], ""]
        elif e[0] == "arguments":
            calls[e[1]][1] += e[2]
    return content, [(name, json.loads(args)) for name, args in calls.values()], events


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
@pytest.mark.parametrize("fmt, text", CASES)
def test_streamed_calls_equal_the_whole_text_parse(fmt, text, how):
    content, calls, _ = _streamed(fmt, _pieces(text, how))
    expected_content, expected = parse_tool_calls(text, fmt)
    assert calls == [(c.name, json.loads(c.arguments)) for c in expected]
    if expected:
        assert content.strip() == expected_content.strip()
    else:
        assert content == text


def test_a_call_starts_once_its_head_is_in_and_its_arguments_stream():
    text = f'<tool_call>\n{{"name": "weather", "arguments": {ARGS}}}\n</tool_call>'
    stream = ToolCallStream("hermes")
    head = text.index('"arguments": ') + len('"arguments": ')
    assert stream.feed(text[:head - 3]) == []
    assert stream.feed(text[head - 3:head + 1]) == [("call", 0, "weather"), ("arguments", 0, "{")]
    assert stream.feed(text[head + 1:head + 9]) == [("arguments", 0, text[head + 1:head + 9])]


def test_text_before_a_call_streams_and_a_tag_prefix_is_held():
    stream = ToolCallStream("hermes")
    assert stream.feed("Checking the weather ") == [("text", "Checking the weather")]
    assert stream.feed("now <tool") == [("text", " now")]
    assert stream.feed("_call>") == []
    assert stream.finish() == [("text", " <tool_call>")]  # (no call in it: the held text is content after all)


def test_a_call_cut_off_by_the_token_limit_stays_begun():
    cut = '<tool_call>{"name": "weather", "arguments": {"city": "Pa'
    stream = ToolCallStream("hermes")
    events = stream.feed(cut) + stream.finish()
    assert events == [("call", 0, "weather"), ("arguments", 0, '{"city": "Pa')]
    assert parse_tool_calls(cut, "hermes")[1] == []
