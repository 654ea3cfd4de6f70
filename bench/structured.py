"""Structured output on the real default model (SmolLM2-135M-Instruct, CPU float32 unless --device): 20
JSON schemas (nested objects, bounded arrays, enums, required and optional fields, integer and number
ranges, string patterns and lengths), each prompt answered once under its schema (response_format
json_schema) and once free; then a regex and a choice list. Reports how many outputs parse and validate
(jsonschema) each way (the free share shows that the constraint is what makes them valid), the grammar
compile time per schema, and the decode rate with and without the constraint.

Run:  python bench/structured.py [--device cpu] [--max-tokens 160] [--json bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import jsonschema  # noqa: E402

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.grammar import GrammarSpec, grammar_spec  # noqa: E402
from edgellm.models import default_model_dir  # noqa: E402


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


S, I, N, B = {"type": "string", "maxLength": 40}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
CASES = [
    ("a person with a name and an age", _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a book: title, author and year", _obj({"title": S, "author": S, "year": {"type": "integer", "minimum": 1400,
                                                                                   "maximum": 2030}})),
    ("a city and its country", _obj({"city": S, "country": S})),
    ("a product with a price in dollars", _obj({"product": S, "price": {"type": "number", "minimum": 0,
                                                                         "maximum": 10000}})),
    ("the weather today", _obj({"sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                                "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60}})),
    ("three colours", _obj({"colours": {"type": "array", "items": S, "minItems": 3, "maxItems": 3}})),
    ("a shopping list of 1 to 5 items", _obj({"items": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                        "minItems": 1, "maxItems": 5}})),
    ("a user account with an optional nickname", _obj({"username": {"type": "string", "pattern": "^[a-z]{3,12}$"},
                                                       "nickname": S}, required=["username"])),
    ("a point in 2D", _obj({"x": {"type": "number", "minimum": -100, "maximum": 100},
                            "y": {"type": "number", "minimum": -100, "maximum": 100}})),
    ("a to-do item and whether it is done", _obj({"task": S, "done": B})),
    ("a student with grades", _obj({"name": S, "grades": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 100}, "minItems": 1, "maxItems": 4}})),
    ("an address", _obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a company and its CEO", _obj({"company": S, "ceo": _obj({"first": S, "last": S})})),
    ("a movie rating", _obj({"movie": S, "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                             "review": {"type": "string", "minLength": 3, "maxLength": 60}})),
    ("a date", _obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                     "month": {"type": "integer", "minimum": 1, "maximum": 12},
                     "day": {"type": "integer", "minimum": 1, "maximum": 31}})),
    ("an animal and its sound", _obj({"animal": {"enum": ["dog", "cat", "cow", "duck"]}, "sound": S})),
    ("a recipe with ingredients", _obj({"dish": S, "ingredients": {"type": "array", "items": _obj(
        {"name": {"type": "string", "maxLength": 20}, "grams": {"type": "integer", "minimum": 1, "maximum": 1000}}),
        "minItems": 1, "maxItems": 3}})),
    ("a flight code and its gate", _obj({"flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                          "gate": {"type": "string", "pattern": "^[A-F][0-9]{1,2}$"}})),
    ("a server status", _obj({"host": S, "up": B, "load": {"type": "number", "minimum": 0, "maximum": 1},
                              "region": {"enum": ["eu", "us", "asia"]}}, required=["host", "up"])),
    ("a team of two people with roles", _obj({"team": S, "members": {"type": "array", "items": _obj(
        {"name": {"type": "string", "maxLength": 20}, "role": {"enum": ["lead", "dev", "qa"]}}),
        "minItems": 2, "maxItems": 2}})),
]


def compile_times(runtime) -> list[float]:
    """ms to compile each schema of CASES for the runtime's tokenizer (each compiled once: the cache is cold)."""
    backend = runtime._grammar_backend()
    out = []
    for _, schema in CASES:
        began = time.perf_counter()
        backend.compile(GrammarSpec("json_schema", json.dumps(schema)))
        out.append((time.perf_counter() - began) * 1e3)
    return out


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def _messages(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with only a JSON object describing {topic}."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runtime = LLMInferenceRuntime(default_model_dir(), device=args.device,
                                  dtype="float32" if args.device == "cpu" else "float16",
                                  max_batch_size=len(CASES), max_kv_cache_capacity=512)
    compile_ms = compile_times(runtime)
    rows = {}
    for label, constrained in (("free", False), ("json_schema", True)):
        items = [{"messages": _messages(topic), **({"response_format": {"type": "json_schema", "json_schema": {
            "name": "case", "schema": schema, "strict": True}}} if constrained else {})} for topic, schema in CASES]
        began = time.perf_counter()
        response = runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=args.max_tokens,
                                                               temperature=0))
        seconds = time.perf_counter() - began
        valid = [_valid(text, schema) for text, (_, schema) in zip(response.output_texts, CASES)]
        tokens = sum(len(ids) for ids in response.output_ids)
        rows[label] = dict(valid=sum(valid), cases=len(CASES), tokens=tokens, seconds=seconds,
                           finish=response.finish_reasons, outputs=response.output_texts)
        print(f"{label:12s} valid {sum(valid):2d}/{len(CASES)}   {tokens} tokens in {seconds:.1f} s "
              f"({tokens / seconds:.0f} tok/s, 20 rows)", flush=True)
    # Constrained and free rows in one batch: the free rows' outputs as in the all-free batch.
    mixed = [{"messages": _messages(topic), **({"response_format": {"type": "json_schema", "json_schema": {
        "name": "case", "schema": schema}}} if i % 2 else {})} for i, (topic, schema) in enumerate(CASES)]
    response = runtime.handle_request(LLMGenerationRequest(requests=mixed, max_generate_length=args.max_tokens,
                                                           temperature=0))
    free_same = sum(response.output_texts[i] == rows["free"]["outputs"][i] for i in range(0, len(CASES), 2))
    mixed_valid = sum(_valid(response.output_texts[i], CASES[i][1]) for i in range(1, len(CASES), 2))
    rows["mixed"] = dict(free_unchanged=free_same, free_rows=len(CASES[::2]), constrained_valid=mixed_valid)
    print(f"mixed batch  free rows unchanged {free_same}/{len(CASES[::2])}, constrained valid "
          f"{mixed_valid}/{len(CASES[1::2])}")
    regex = r"[0-9]{3}-[0-9]{4}"
    text = runtime.handle_request(LLMGenerationRequest(
        requests=[{"messages": _messages("nothing; write a phone number")}], max_generate_length=20, temperature=0,
        response_format=grammar_spec(guided_regex=regex))).output_texts[0]
    choices = ["positive", "negative", "neutral"]
    picked = runtime.handle_request(LLMGenerationRequest(
        requests=[{"messages": [{"role": "user", "content": "Sentiment of 'I love this!'?"}]}],
        max_generate_length=10, temperature=0, response_format=grammar_spec(guided_choice=choices))).output_texts[0]
    print(f"regex {regex}: {text!r} ({'matches' if re.fullmatch(regex, text) else 'NO MATCH'}); "
          f"choice: {picked!r} ({'in the list' if picked in choices else 'NOT IN THE LIST'})")
    print(f"grammar compile per schema: median {sorted(compile_ms)[len(compile_ms) // 2]:.1f} ms, "
          f"max {max(compile_ms):.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, compile_ms=compile_ms, regex=[regex, text],
                                             choice=[choices, picked]), indent=2) + "\n")


if __name__ == "__main__":
    main()
