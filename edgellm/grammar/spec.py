"""GrammarSpec: the constraint of a request's rows, from OpenAI's `response_format` ({"type": "text"},
{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; and, for
Python and `edgellm run` files, {"type": "regex", "regex": ...}, {"type": "choice", "choices": [...]},
{"type": "grammar", "grammar": EBNF}) or one of the extras vLLM names guided_json, guided_regex,
guided_choice and guided_grammar (EBNF, as XGrammar reads it). Checked for shape here; whether the backend can compile it is checked when it does
(backend.py), both before any model work."""

from __future__ import annotations

import dataclasses
import json

from ..errors import GrammarError

KINDS = ("json_object", "json_schema", "regex", "choice", "ebnf", "tagged_json")


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    kind: str    # one of KINDS
    source: str  # json_schema: the schema's JSON text; regex; choice: a JSON list of strings; ebnf; json_object: "";
    # tagged_json: JSON text of {"prefix", "schema", "suffix"} (a tool call: the schema's JSON between two literals)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; kinds: {', '.join(KINDS)}")


def grammar_spec(response_format=None, *, guided_json=None, guided_regex=None, guided_choice=None,
                 guided_grammar=None) -> GrammarSpec | None:
    """The one constraint these name (None: free text); GrammarError for a malformed one or two at once."""
    given = [name for name, value in (("response_format", _constraining(response_format)), ("guided_json", guided_json),
                                      ("guided_regex", guided_regex), ("guided_choice", guided_choice),
                                      ("guided_grammar", guided_grammar)) if value is not None]
    if len(given) > 1:
        raise GrammarError(f"one constraint per request: {' and '.join(given)} were both given")
    if not given:
        return None
    if response_format is not None and given == ["response_format"]:
        return _response_format(response_format)
    if guided_json is not None:
        return GrammarSpec("json_schema", _schema_text(guided_json, "guided_json"))
    if guided_regex is not None:
        if not isinstance(guided_regex, str) or not guided_regex:
            raise GrammarError("guided_regex must be a non-empty regular expression string")
        return GrammarSpec("regex", guided_regex)
    if guided_choice is not None:
        if not isinstance(guided_choice, (list, tuple)) or not guided_choice or \
                not all(isinstance(c, str) and c for c in guided_choice):
            raise GrammarError("guided_choice must be a non-empty list of non-empty strings")
        return GrammarSpec("choice", json.dumps(list(guided_choice)))
    if not isinstance(guided_grammar, str) or not guided_grammar.strip():
        raise GrammarError("guided_grammar must be an EBNF grammar (a string with a root rule)")
    return GrammarSpec("ebnf", guided_grammar)


def _constraining(response_format):
    """response_format unless it is {"type": "text"} (OpenAI's default: no constraint)."""
    if isinstance(response_format, dict) and response_format.get("type") == "text":
        return None
    return response_format


def _response_format(value) -> GrammarSpec:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise GrammarError('response_format must be an object with a "type": "text", "json_object" or '
                                  '"json_schema"')
    kind = value["type"]
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    extra = {"regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
    if kind in extra:
        return grammar_spec(**{extra[kind]: value.get({"choice": "choices"}.get(kind, kind))})
    if kind != "json_schema":
        raise GrammarError(f'response_format type {kind!r} is not one of "text", "json_object", "json_schema" '
                           '(or edgellm\'s "regex", "choice", "grammar")')
    body = value.get("json_schema")
    if not isinstance(body, dict) or "schema" not in body:
        raise GrammarError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
    return GrammarSpec("json_schema", _schema_text(body["schema"], "response_format.json_schema.schema"))


def _schema_text(schema, where: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{where} must be a JSON schema (an object)")
    return json.dumps(schema)  # (key order kept: properties are generated in the order the schema lists them)
