"""Tool calls read while the model writes them, for streamed answers (OpenAI's tool_calls deltas,
Anthropic's tool_use blocks): ToolCallStream takes each text delta and says what became certain:
content text, a call's start with its function name, a piece of its arguments' JSON text.

A call is recognized once its object's head is in: `{"name": "<function>", "arguments": ` (Llama's
"parameters" too), the order every format's templates and tool_calls.call_constraint write. From there
its arguments stream as the model writes them, up to the arguments object's closing brace. Text that may
still turn out to begin a call (a tag's first characters, whitespace before it) is held back until it is
decided. Whatever the stream could not read this way (keys in another order, a malformed block) is held
and settled at the end by tool_calls.parse_tool_calls on the whole text: its calls are then given whole,
or the held text as content where it holds none. The streamed calls thus equal the whole text's parse
(arguments as the model wrote them rather than re-serialized), except for a call cut off by the token
limit, which the stream began and the whole-text parse drops.
"""

from __future__ import annotations

import json

from .tool_calls import parse_tool_calls

_TAGS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama": "<|python_tag|>"}
_SEPARATORS = {"hermes": " \t\r\n", "mistral": " \t\r\n[,]", "llama": " \t\r\n;"}
_CLOSE = "</tool_call>"  # (hermes: the end of each call's block)


class ToolCallStream:
    def __init__(self, fmt: str):
        self.fmt = fmt
        self.calls = 0  # calls begun so far
        self._text = ""
        self._at = 0  # where reading goes on in _text
        self._sent = 0  # _text before this is sent (as content) or read as calls
        self._region = 0  # where the first call's tag (or object) began: content again if no call is in it
        self._state = "start" if fmt == "llama" else "text"
        self._object = 0  # the call object being read: where it begins
        self._depth = 0  # (in its arguments: JSON nesting; then in the rest of the object)
        self._in_string = self._escaped = False

    @property
    def cut_off(self) -> bool:
        """The answer ended inside a call's arguments (the token limit): that call's JSON is incomplete."""
        return self._state in ("args", "rest")

    @property
    def called(self) -> bool:
        """The answer holds a whole call: its finish reason is a tool call's (tool_calls, tool_use)."""
        return self.calls > 0 and not self.cut_off

    def feed(self, text: str, final: bool = False) -> list[tuple]:
        """Events of what `text` (the next delta) makes certain: ("text", s), ("call", index, name),
        ("arguments", index, s); final: the answer ends with it (finish()'s events follow)."""
        self._text += text
        events: list[tuple] = []
        while self._step(events):
            pass
        return events + self.finish() if final else events

    def finish(self) -> list[tuple]:
        """The last events, once the answer is whole: the held text, or the calls only the whole text shows."""
        events: list[tuple] = []
        if self._state in ("text", "plain", "start"):
            rest = self._text[self._sent:]
            if self.calls:
                rest = rest.rstrip()
            if rest.strip() or not self.calls and rest:
                events.append(("text", rest))
            return events
        if self._state in ("args", "rest", "between") and self.calls:
            return events  # (a call the token limit cut off, or the calls' region open at the end)
        _, calls = parse_tool_calls(self._text, self.fmt)
        if len(calls) <= self.calls:  # (nothing more the whole text holds: the held text is content)
            if not self.calls:
                events.append(("text", self._text[self._region:]))
            return events
        for call in calls[self.calls:]:
            events += [("call", self.calls, call.name), ("arguments", self.calls, call.arguments)]
            self.calls += 1
        return events

    # ---- the reader: one move per call, False when it waits for more text ----

    def _step(self, events: list[tuple]) -> bool:
        state, text, at = self._state, self._text, self._at
        if state == "start":  # (llama: a call is the whole answer, after <|python_tag|> or alone)
            stripped = text[at:].lstrip()
            if not stripped:
                return False
            tag = _TAGS["llama"]
            if stripped.startswith(tag):
                self._at = text.index(tag, at) + len(tag)
            elif tag.startswith(stripped):
                return False
            elif not stripped.startswith("{"):
                self._state = "plain"
                return True
            self._state, self._sent, self._region = "between", self._at, at
            return True
        if state == "plain":
            if len(text) > self._sent:
                events.append(("text", text[self._sent:]))
                self._sent = self._at = len(text)
            return False
        if state == "text":
            return self._read_text(events)
        if state == "between":
            return self._read_between()
        if state == "head":
            return self._read_head(events)
        if state in ("args", "rest"):
            return self._read_json(events)
        return False  # ("held": settled by finish)

    def _read_text(self, events: list[tuple]) -> bool:
        text, tag = self._text, _TAGS[self.fmt]
        found = text.find(tag, self._at)
        if found >= 0:
            before = text[self._sent:found].rstrip()
            if before:
                events.append(("text", before))
            if not self.calls:
                self._region = self._sent + len(before)
            self._at = self._sent = found + len(tag)
            self._state = "between"
            return True
        held = next((k for k in range(min(len(tag) - 1, len(text) - self._sent), 0, -1)
                     if tag.startswith(text[len(text) - k:])), 0)
        end = len(text) - held
        while end > self._sent and text[end - 1].isspace():  # (whitespace held: a call may follow it)
            end -= 1
        if end > self._sent:
            events.append(("text", text[self._sent:end]))
            self._sent = end
        self._at = len(text) - held
        return False

    def _read_between(self) -> bool:
        text, at = self._text, self._at
        while at < len(text) and text[at] in _SEPARATORS[self.fmt]:
            at += 1
        self._at = self._sent = at
        if at == len(text):
            return False
        if self.fmt == "hermes" and not text.startswith("{", at):
            rest = text[at:at + len(_CLOSE)]
            if text.startswith(_CLOSE, at):
                self._at = self._sent = at + len(_CLOSE)
                self._state = "text"
                return True
            if _CLOSE.startswith(rest):
                return False
        if not text.startswith("{", at):
            self._state = "held"
            return False
        self._object, self._state = at, "head"
        return True

    def _read_head(self, events: list[tuple]) -> bool:
        head = _call_head(self._text, self._object)
        if head is None:
            return False
        if head is False:
            self._state = "held"
            return False
        name, self._at = head
        events.append(("call", self.calls, name))
        self.calls += 1
        self._sent, self._state = self._at, "args"
        self._depth, self._in_string, self._escaped = 0, False, False
        return True

    def _read_json(self, events: list[tuple]) -> bool:
        """The arguments' text up to their closing brace ("args"), then the rest of the call's object ("rest")."""
        text, at = self._text, self._at
        done = False
        while at < len(text) and not done:
            c = text[at]
            at += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                done = self._depth == 0 if self._state == "args" else self._depth < 0
        if self._state == "args" and at > self._sent:
            events.append(("arguments", self.calls - 1, text[self._sent:at]))
        self._at = self._sent = at
        if not done:
            return False
        if self._state == "args":
            self._state, self._depth = "rest", 0
        else:
            self._state = "between"
        return True


def _call_head(text: str, at: int):
    """(function name, where its arguments' value begins) of the call object at `at`; None while the
    head is not all in; False where the object does not begin as a call's does."""
    at = _skip(text, at)
    if at == len(text):
        return None
    if text[at] != "{":
        return False
    expected = [("string", ("name",)), (":",), ("string", None), (",",), ("string", ("arguments", "parameters")),
                (":",)]
    at += 1
    name = None
    for part in expected:
        at = _skip(text, at)
        if at == len(text):
            return None
        if part[0] == "string":
            if text[at] != '"':
                return False
            end = _string_end(text, at)
            if end is None:
                return None
            value = json.loads(text[at:end])
            if part[1] is not None and value not in part[1]:
                return False
            if part[1] is None:
                name = value
            at = end
        elif text[at] != part[0]:
            return False
        else:
            at += 1
    at = _skip(text, at)
    if at == len(text):
        return None
    return (name, at) if text[at] == "{" else False


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _string_end(text: str, at: int) -> int | None:
    """Past the JSON string that opens at `at` (None: it does not end in `text` yet)."""
    escaped = False
    for i in range(at + 1, len(text)):
        if escaped:
            escaped = False
        elif text[i] == "\\":
            escaped = True
        elif text[i] == '"':
            return i + 1
    return None
