"""Tool calls through the server (`openai` and `anthropic` clients, a real uvicorn server on 127.0.0.1),
on a tiny random model whose chat template is in Qwen2.5's manner (<tool_call> JSON blocks): a named function or
"required" makes the answer one call whose arguments validate against the function's schema (streamed
the same), "auto" answers text when the model writes no call, earlier calls and tool results in the
history are rendered, and bad tools or tool_choice values are 400s naming the parameter; Anthropic's
tool_use blocks (streamed too) and tool_result turns."""

import json

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMInferenceRuntime  # noqa: E402

from byte_level_model import TOOL_TEMPLATE, byte_level_model  # noqa: E402
from http_server import running_server  # noqa: E402

pytestmark = pytest.mark.reference_ops

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
             "required": ["zone"], "additionalProperties": False}}}]
CHAT = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tools") / "model"
    byte_level_model(model_dir, chat_template=TOOL_TEMPLATE)
    runtime = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=4, max_kv_cache_capacity=1024)
    with running_server(runtime) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _call_of(choice, schemas):
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return call


def test_named_function_call_validates_and_streams_the_same(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = client.chat.completions.create(model="model", messages=CHAT, tools=TOOLS, tool_choice=named,
                                         max_tokens=120, temperature=0.9, seed=3)
    call = _call_of(got.choices[0], {"get_weather": WEATHER})
    assert call.function.name == "get_weather"
    chunks = list(client.chat.completions.create(model="model", messages=CHAT, tools=TOOLS, tool_choice=named,
                                                 max_tokens=120, temperature=0.9, seed=3, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 5  # (the arguments come piece by piece, as they are written)
    arguments = "".join(d.function.arguments for d in deltas)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_picks_one_of_the_tools(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        got = client.chat.completions.create(model="model", messages=CHAT, tools=TOOLS, tool_choice="required",
                                             max_tokens=120, temperature=1.0, seed=seed)
        _call_of(got.choices[0], schemas)


def test_auto_without_a_call_answers_text_and_history_is_rendered(client):
    history = CHAT + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    short = client.chat.completions.create(model="model", messages=CHAT, tools=TOOLS, max_tokens=8, temperature=0)
    got = client.chat.completions.create(model="model", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert got.usage.prompt_tokens > short.usage.prompt_tokens + 20  # (the call and its result are in the prompt)
    for answer in (short, got):
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert isinstance(answer.choices[0].message.content, str) and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tools_get_a_400_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="model", messages=CHAT, max_tokens=4, extra_body=extra)
    assert caught.value.body["param"] == param


@pytest.fixture(scope="module")
def claude(client):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=str(client.base_url).removesuffix("/v1/"), api_key="unused", max_retries=0,
                               timeout=60)


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]


def test_anthropic_tool_use_validates_streams_and_takes_results(claude):
    got = claude.messages.create(model="model", max_tokens=120, messages=CHAT, tools=ANTHROPIC_TOOLS,
                                 tool_choice={"type": "tool", "name": "get_weather"})
    assert got.stop_reason == "tool_use"
    (block,) = [b for b in got.content if b.type == "tool_use"]
    assert block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER)
    with claude.messages.stream(model="model", max_tokens=120, messages=CHAT, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "any"}) as stream:
        pieces = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and len(pieces) > 5  # (the input streams as it is written)
    jsonschema.validate([b for b in final.content if b.type == "tool_use"][0].input, WEATHER)
    history = CHAT + [{"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name,
                                                         "input": block.input}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                                    "content": "4 degrees"}]}]
    answer = claude.messages.create(model="model", max_tokens=6, messages=history, tools=ANTHROPIC_TOOLS,
                                    tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.usage.input_tokens > got.usage.input_tokens
