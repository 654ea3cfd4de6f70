"""Structured output (edgellm/grammar/, the token mask in kernels/logit_processing.py, the engine loop's
matcher): a tiny random Llama over a byte-level BPE vocabulary (every text spellable, as real models'
are) generates under JSON schemas, a regex, a choice list and EBNF; every output parses and validates
(jsonschema, re.fullmatch) though the weights are random; free rows beside a constrained one are
unchanged; bad constraints are refused before any model work."""

import dataclasses
import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.errors import InvalidRequestError  # noqa: E402
from edgellm.grammar import GrammarSpec, grammar_spec  # noqa: E402

from byte_level_model import byte_level_model  # noqa: E402

pytestmark = pytest.mark.reference_ops

@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("bytes") / "model"
    byte_level_model(model_dir)
    return LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=4, max_kv_cache_capacity=512)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}}, "required": ["ok", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"},
     "inner": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}},
               "required": ["x"], "additionalProperties": False}}, "required": ["id", "inner"],
     "additionalProperties": False},
]


def _generate(runtime, prompt="Give JSON:", **settings):
    settings.setdefault("max_generate_length", 200)
    request = LLMGenerationRequest(requests=[{"prompt": prompt}], **settings)
    return runtime.handle_request(request)


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(runtime, schema, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    response = _generate(runtime, response_format=fmt, temperature=temperature, seed=3)
    text = response.output_texts[0]
    assert response.finish_reasons == ["stop"], text
    jsonschema.validate(json.loads(text), schema)


def test_the_constraint_acts(runtime):
    """Unconstrained, the random model writes no JSON; json_object makes it write a JSON object."""
    free = _generate(runtime, temperature=1.0, seed=1, max_generate_length=40).output_texts[0]
    with pytest.raises(ValueError):
        json.loads(free)
    text = _generate(runtime, response_format={"type": "json_object"}, temperature=1.0, seed=1).output_texts[0]
    assert isinstance(json.loads(text), dict)


def test_regex_choice_and_ebnf(runtime):
    text = _generate(runtime, response_format=grammar_spec(guided_regex=r"[0-9]{3}-[a-c]+"), temperature=1.0,
                     seed=2, max_generate_length=30).output_texts[0]
    assert re.fullmatch(r"[0-9]{3}-[a-c]+", text), text
    choices = ["red alert", "green", "blue \"sky\""]
    for seed in range(3):
        text = _generate(runtime, response_format=grammar_spec(guided_choice=choices), temperature=1.0,
                         seed=seed).output_texts[0]
        assert text in choices
    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    text = _generate(runtime, response_format=GrammarSpec("ebnf", ebnf), temperature=1.0, seed=4,
                     max_generate_length=60).output_texts[0]
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text


def test_free_rows_beside_a_constrained_one_are_unchanged(runtime):
    alone = [_generate(runtime, prompt, temperature=0, max_generate_length=12).output_ids[0]
             for prompt in ("one", "two three")]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}}
    request = LLMGenerationRequest(requests=[{"prompt": "one"}, {"prompt": "Give JSON:", "response_format": fmt},
                                             {"prompt": "two three"}], max_generate_length=12, temperature=0)
    handles = [runtime.submit(LLMGenerationRequest(requests=[{"prompt": "one"}], max_generate_length=12,
                                                   temperature=0))]
    handles.append(runtime.submit(request))
    together = handles[1].result(60)
    assert handles[0].result(60).output_ids[0] == alone[0]
    assert [together.output_ids[0], together.output_ids[2]] == alone
    assert together.output_texts[1].startswith("{")


def test_steps_in_halves_give_what_whole_steps_give(runtime, monkeypatch):
    """While constrained rows run, decode steps go in halves (the forward; the step before read, the rows'
    next masks filled together and set; the draw): the same tokens as whole steps each read before the next
    (run-ahead off), for three grammars and a free row sampled side by side, and a second request's rows
    (a choice list for three rows of one prompt, a free row) joining through mixed steps meanwhile."""
    fmts = [{"type": "json_schema", "json_schema": {"name": "x", "schema": schema}} for schema in SCHEMAS]
    first = LLMGenerationRequest(requests=[{"prompt": f"JSON {i}:", "response_format": fmt}
                                           for i, fmt in enumerate(fmts)] + [{"prompt": "free"}],
                                 max_generate_length=40, temperature=1.0, seed=7)
    choice = grammar_spec(guided_choice=["left", "right"])
    second = LLMGenerationRequest(requests=[{"prompt": "Pick:", "response_format": choice}] * 3 +
                                  [{"prompt": "more free text"}], max_generate_length=12, temperature=1.0, seed=2)

    def both():
        handles = [runtime.submit(first), runtime.submit(second)]
        return [h.result(120) for h in handles]

    before = runtime._loop.step_counts["decode_in_halves"]
    halves = both()
    assert runtime._loop.step_counts["decode_in_halves"] - before >= 10
    monkeypatch.setattr(runtime.runner, "switches", dataclasses.replace(runtime.runner.switches, run_ahead=False))
    before = runtime._loop.step_counts["decode_in_halves"]
    whole = both()
    assert runtime._loop.step_counts["decode_in_halves"] == before
    assert [r.output_ids for r in halves] == [r.output_ids for r in whole]
    for text, schema in zip(halves[0].output_texts, SCHEMAS):
        jsonschema.validate(json.loads(text), schema)
    assert set(halves[1].output_texts[:3]) <= {"left", "right"}


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": "nope"}}}}},
     "JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "xml"}, "response_format type"),
    (GrammarSpec("regex", "(unclosed"), "regular expression"),
    (GrammarSpec("ebnf", "root ::= missing_rule"), "EBNF"),
])
def test_bad_constraints_are_refused_before_any_model_work(runtime, fmt, words):
    steps = dict(runtime._loop.step_counts)
    with pytest.raises(InvalidRequestError, match=words):
        _generate(runtime, response_format=fmt)
    assert dict(runtime._loop.step_counts) == steps
    choice = grammar_spec(guided_choice=["yes", "no"])
    assert _generate(runtime, response_format=choice).output_texts[0] in ("yes", "no")


def test_grammar_spec_refuses_two_constraints_and_bad_extras():
    with pytest.raises(InvalidRequestError, match="one constraint"):
        grammar_spec({"type": "json_object"}, guided_regex="a")
    with pytest.raises(InvalidRequestError, match="guided_choice"):
        grammar_spec(guided_choice=[])
    assert grammar_spec({"type": "text"}) is None
    assert grammar_spec({"type": "regex", "regex": "a+"}) == GrammarSpec("regex", "a+")
    assert grammar_spec({"type": "choice", "choices": ["x", "y"]}) == grammar_spec(guided_choice=["x", "y"])
    assert grammar_spec({"type": "grammar", "grammar": 'root ::= "a"'}) == GrammarSpec("ebnf", 'root ::= "a"')


def test_bounded_strings_hold_no_raw_control_bytes(runtime):
    """XGrammar's length-bounded strings admit raw tabs and other control bytes, which JSON does not: the
    JSON-safe filter keeps them out of every draw (20 sampled answers, strict json.loads)."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    request = LLMGenerationRequest(requests=[{"prompt": f"Say {i}:"} for i in range(4)], max_generate_length=60,
                                   response_format=fmt, temperature=1.0, top_k=0)
    for seed in range(5):
        for text in runtime.handle_request(dataclasses.replace(request, seed=seed)).output_texts:
            jsonschema.validate(json.loads(text), schema)
            assert not any(ord(c) < 32 for c in text), text
