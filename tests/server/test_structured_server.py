"""Structured output through the server (`openai` client, a real uvicorn server on 127.0.0.1): chat with
response_format json_schema (streamed too) validates and equals handle_request's; completions with the
extras guided_regex and guided_choice; a bad schema or regex is a 400 naming the parameter, and the
server keeps serving."""

import json
import re

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402

from byte_level_model import byte_level_model  # noqa: E402
from http_server import running_server  # noqa: E402

pytestmark = pytest.mark.reference_ops

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "rain": {"type": "boolean"}},
          "required": ["city", "rain"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Weather as JSON:"}]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("bytes") / "model"
    byte_level_model(model_dir)
    return LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=4, max_kv_cache_capacity=512)


@pytest.fixture(scope="module")
def client(runtime):
    with running_server(runtime) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_json_schema_validates_and_equals_handle_request(runtime, client):
    expected = runtime.handle_request(LLMGenerationRequest(requests=[{"messages": CHAT}], max_generate_length=120,
                                                           temperature=0.8, top_k=0, seed=7, response_format=FORMAT))
    got = client.chat.completions.create(model="model", messages=CHAT, max_tokens=120, temperature=0.8, seed=7,
                                         response_format=FORMAT)
    text = got.choices[0].message.content
    assert text == expected.output_texts[0] and got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    streamed = client.chat.completions.create(model="model", messages=CHAT, max_tokens=120, temperature=0.8, seed=7,
                                              response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_completions_take_guided_regex_and_choice(client):
    got = client.completions.create(model="model", prompt="Code:", max_tokens=20, temperature=1.0, seed=1,
                                    extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", got.choices[0].text)
    got = client.completions.create(model="model", prompt="Pick:", max_tokens=20, temperature=1.0, seed=2, n=3,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert {c.text for c in got.choices} <= {"left", "right"}


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_choice": "left"}, "guided_choice"),
])
def test_bad_constraints_get_a_400_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="model", messages=CHAT, max_tokens=5, extra_body=extra)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    ok = client.chat.completions.create(model="model", messages=CHAT, max_tokens=40, temperature=0,
                                        extra_body={"guided_choice": ["a", "b"]})
    assert ok.choices[0].message.content in ("a", "b")
