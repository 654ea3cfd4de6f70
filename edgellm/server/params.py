"""Reading request bodies: each field checked for type and range, errors naming the field (a 400 with
OpenAI's `param`), fields no handler reads refused as unknown, and the sampling settings both APIs share."""

from __future__ import annotations

import base64
import binascii
import math

from ..errors import GrammarError
from ..grammar import grammar_spec
from .errors import ApiError, invalid

_MISSING = object()


class Body:
    """A request's JSON object, read one field at a time; unknown() names the fields nothing read."""

    def __init__(self, body, ignored: tuple[str, ...] = ()):
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        self._body, self._read = body, set(ignored)

    def raw(self, name: str, default=None):
        self._read.add(name)
        value = self._body.get(name, _MISSING)
        return default if value is _MISSING or value is None else value

    def number(self, name: str, default=None, *, low=None, high=None, low_open=False):
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise invalid(f"{name} must be a number, got {value!r}", name)
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low if low is not None else float('-inf'):g}, " \
                     f"{high if high is not None else float('inf'):g}]"
            raise invalid(f"{name} must be in {bounds}, got {value!r}", name)
        return value

    def integer(self, name: str, default=None, *, low=None, high=None):
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(f"{name} must be an integer, got {value!r}", name)
        if (low is not None and value < low) or (high is not None and value > high):
            raise invalid(f"{name} must be an integer in [{low if low is not None else '-inf'}, "
                          f"{high if high is not None else 'inf'}], got {value!r}", name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise invalid(f"{name} must be true or false, got {value!r}", name)
        return value

    def string(self, name: str, default=None):
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string, got {type(value).__name__}", name)
        return value

    def obj(self, name: str) -> dict:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise invalid(f"{name} must be an object", name)
        return value

    def strings(self, name: str, *, most: int) -> list[str] | None:
        """A string or a list of up to `most` non-empty strings (OpenAI's `stop`)."""
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return None
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise invalid(f"{name} must be a string or a list of strings", name)
        if len(values) > most:
            raise invalid(f"{name} takes at most {most} strings, got {len(values)}", name)
        values = [v for v in values if v]
        return values or None

    def unknown(self) -> None:
        extra = sorted(set(self._body) - self._read)
        if extra:
            raise invalid(f"unrecognized request argument{'s' if len(extra) > 1 else ''}: {', '.join(extra)}",
                          extra[0])


def structured(body: Body) -> dict:
    """OpenAI's response_format and the extras guided_json, guided_regex, guided_choice and guided_grammar
    (vLLM's names) as LLMGenerationRequest's response_format (a GrammarSpec, or None)."""
    names = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    given = {name: body.raw(name) for name in names}
    fmt = body.raw("response_format")
    try:
        return {"response_format": grammar_spec(fmt, **given)}
    except GrammarError as exc:
        named = [name for name in names if given[name] is not None]
        raise invalid(str(exc), named[0] if named and fmt is None else "response_format") from None


def processing(body: Body) -> dict:
    """OpenAI's presence_penalty, frequency_penalty ([-2, 2]) and logit_bias (token id strings -> [-100,
    100]), and the extras repetition_penalty (> 0) and min_p ([0, 1]), as LLMGenerationRequest fields."""
    bias = body.obj("logit_bias")
    converted = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise invalid(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key}", "logit_bias")
        converted[token] = float(value)
    return {"presence_penalty": body.number("presence_penalty", 0.0, low=-2, high=2),
            "frequency_penalty": body.number("frequency_penalty", 0.0, low=-2, high=2),
            "repetition_penalty": body.number("repetition_penalty", 1.0, low=0, low_open=True),
            "min_p": body.number("min_p", 0.0, low=0, high=1), "logit_bias": converted or None}


def sampling(body: Body, defaults: dict, *, temperature_high: float = 2.0) -> dict:
    """temperature, top_p, top_k (an extra: 0 or -1 disable it) and seed as LLMGenerationRequest
    fields. Left out, each takes the model's generation_config.json value, else OpenAI's default
    (temperature 1, top_p 1, no top-k): a server client expects no hidden top-k."""
    top_k = body.integer("top_k", low=-1)
    return {"temperature": body.number("temperature", low=0, high=temperature_high),
            "top_p": body.number("top_p", low=0, high=1, low_open=True),
            "top_k": defaults.get("top_k", 0) if top_k is None else max(top_k, 0),
            "seed": body.integer("seed", low=-(1 << 63), high=(1 << 64) - 1)}


def message_of(role: str, parts: list[dict]) -> dict:
    """A chat message for the runtime from its content parts: text-only parts joined into one string (a
    chat template may expect a string for any role), else the text and image parts as they are."""
    if all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def data_uri_bytes(url: str, where: str) -> bytes:
    """The bytes of a base64 `data:` URI. The server never fetches: any other URL is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise invalid(f"{where}: only data: URIs (base64) are accepted; the server does not fetch URLs", where)
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise invalid(f"{where}: a data: URI must be base64 encoded (data:image/png;base64,...)", where)
    return base64_bytes(payload, where)


def base64_bytes(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise invalid(f"{where}: invalid base64 data ({exc})", where) from None


def model_adapter(name, models: dict[str, str]) -> tuple[str, str]:
    """(model id, adapter name: "" for the base model) of a request's `model`; 404 if unknown.
    `models`: id -> adapter. A request without a model runs the base model."""
    if name is None:
        base = next(iter(models))
        return base, models[base]
    if not isinstance(name, str):
        raise invalid("model must be a string", "model")
    if name not in models:
        raise ApiError(404, f"The model `{name}` does not exist; this server has: {', '.join(models)}",
                       param="model", code="model_not_found")
    return name, models[name]
