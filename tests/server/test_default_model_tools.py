"""The default model (SmolLM2-135M-Instruct, whose chat template renders no tools: they go in the system
turn, tool_calls.generic_tool_messages) behind a real server on 127.0.0.1, through the `openai` client:
with tool_choice a named function, the answer is that call and its arguments validate against the
function's schema; with a JSON schema response_format, the answer validates."""

import json

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMInferenceRuntime  # noqa: E402

from http_server import running_server  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def client(default_model_dir):
    runtime = LLMInferenceRuntime(default_model_dir, device="cpu", max_batch_size=2, max_kv_cache_capacity=1024)
    with running_server(runtime) as (url, state):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), state


def test_named_function_call_on_the_default_model(client):
    client, state = client
    got = client.chat.completions.create(
        model=state.settings.model_name, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60,
        temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert "paris" in arguments["city"].lower()


def test_json_schema_answer_on_the_default_model(client):
    client, state = client
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    got = client.chat.completions.create(
        model=state.settings.model_name, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=60, temperature=0)
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
