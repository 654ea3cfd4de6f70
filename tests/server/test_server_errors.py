"""Every error the server answers, in OpenAI's shape and status, with the server and runtime still serving
after each: malformed JSON, unknown parameters and values (naming the parameter), unknown model, prompt
past the limits (with the numbers), queue full (429 + Retry-After), draining and loading (503), API key
(401), body size (413), remote image URLs; run-time LoRA loading only when allowed."""

import threading

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.server import ServerSettings

from http_server import httpx, running_server

pytestmark = pytest.mark.reference_ops

CHAT = [{"role": "user", "content": "w3 w7 w11"}]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2, max_kv_cache_capacity=64,
                               max_input_length=32, max_queued=1)


@pytest.fixture(scope="module")
def server(runtime):
    with running_server(runtime, ServerSettings(max_request_bytes=4096)) as (url, state):
        yield url, state


def _post(url, path, body=None, content=None, **headers):
    return httpx.post(url + path, json=body, content=content, headers=headers, timeout=60)


def _still_serving(url, state):
    answer = _post(url, "/v1/chat/completions", {"model": state.settings.model_name, "messages": CHAT,
                                                 "max_tokens": 3, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("body, param, words", [
    ({"messages": CHAT, "temperature": 3}, "temperature", "[0, 2]"),
    ({"messages": CHAT, "top_p": 0}, "top_p", "(0, 1]"),
    ({"messages": CHAT, "max_tokens": 0}, "max_tokens", "integer"),
    ({"messages": CHAT, "n": "two"}, "n", "integer"),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": CHAT, "seed": 1.5}, "seed", "integer"),
    ({"messages": CHAT, "stream": "yes"}, "stream", "true or false"),
    ({"messages": CHAT, "frobnicate": 1}, "frobnicate", "unrecognized"),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "wizard", "content": "w3"}]}, "messages", "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages", "does not fetch"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}]},
     "messages", "base64"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "name"),
    ({"messages": CHAT, "presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"messages": CHAT, "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"messages": CHAT, "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"messages": CHAT, "logit_bias": {"5000": 1}}, "logit_bias", "outside the vocabulary"),
    ({"messages": CHAT, "min_p": 2}, "min_p", "[0, 1]"),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs", "logprobs: true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
])
def test_bad_parameters_are_400_naming_the_parameter(server, body, param, words):
    url, state = server
    answer = _post(url, "/v1/chat/completions", {"model": state.settings.model_name, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert error["param"] == param or param in error["message"]


def test_malformed_json_unknown_model_and_oversized_bodies(server):
    url, state = server
    bad = _post(url, "/v1/chat/completions", content=b'{"messages": [', **{"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    not_object = _post(url, "/v1/completions", [1, 2])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    missing = _post(url, "/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and "gpt-4o" in missing.json()["error"]["message"]
    big = _post(url, "/v1/completions", {"model": state.settings.model_name, "prompt": "w3 " * 3000})
    assert big.status_code == 413 and "4096" in big.json()["error"]["message"]
    _still_serving(url, state)


def test_prompt_past_the_limits_is_400_with_the_numbers(server):
    url, state = server
    long = _post(url, "/v1/completions", {"model": state.settings.model_name, "prompt": " ".join(["w3"] * 40)})
    assert long.status_code == 400
    assert "40 tokens" in long.json()["error"]["message"] and "32" in long.json()["error"]["message"]
    room = _post(url, "/v1/completions", {"model": state.settings.model_name, "prompt": "w3 w4", "max_tokens": 100})
    assert room.status_code == 400 and "64" in room.json()["error"]["message"]
    _still_serving(url, state)


def test_queue_full_is_429_with_retry_after(runtime, server):
    url, state = server
    body = {"model": state.settings.model_name, "prompt": "w3 w4", "max_tokens": 3, "temperature": 0}
    answers = []
    with runtime.exclusive():  # the loop cannot run: the first request waits in the queue (max_queued 1)
        waiting = threading.Thread(target=lambda: answers.append(_post(url, "/v1/completions", body)))
        waiting.start()
        for _ in range(500):
            if runtime.serving_stats()["waiting"] == 1:
                break
            threading.Event().wait(0.01)
        full = _post(url, "/v1/completions", body)
    waiting.join(60)
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
    assert answers[0].status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert client.completions.create(**body).choices[0].text == answers[0].json()["choices"][0]["text"]


def test_draining_and_loading_are_503(server):
    url, state = server
    for phase in ("draining", "loading"):
        state.phase = phase
        try:
            answer = _post(url, "/v1/chat/completions", {"messages": CHAT})
            assert answer.status_code == 503 and answer.json()["error"]["type"] == "service_unavailable"
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json()["status"] == phase
        finally:
            state.phase = "ready"
    _still_serving(url, state)


def test_api_key_is_required_on_v1_only(runtime):
    with running_server(runtime, ServerSettings(api_key="s3cret")) as (url, state):
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "s3cre"}):
            answer = httpx.get(url + "/v1/models", headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == state.settings.model_name
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200


def test_lora_loading_only_when_allowed(runtime, server, lora_adapters, tiny_models):
    url, state = server
    refused = _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(lora_adapters["a"][0])})
    assert refused.status_code == 404 and "--allow-lora-loading" in refused.json()["error"]["message"]
    lora_runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2, max_lora_rank=8,
                                       max_loras=2)
    with running_server(lora_runtime, ServerSettings(allow_lora_loading=True)) as (lora_url, lora_state):
        client = openai.OpenAI(base_url=lora_url + "/v1", api_key="x", max_retries=0)
        loaded = _post(lora_url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(lora_adapters["a"][0])})
        assert loaded.status_code == 200, loaded.text
        assert [m.id for m in client.models.list().data] == [lora_state.settings.model_name, "a"]
        expected = lora_runtime.handle_request(LLMGenerationRequest(requests=[{"prompt": "w3 w7"}], temperature=0,
                                                                    max_generate_length=5, lora_weights_name="a"))
        got = client.completions.create(model="a", prompt="w3 w7", max_tokens=5, temperature=0)
        assert got.choices[0].text == expected.output_texts[0]
        again = _post(lora_url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(lora_adapters["a"][0])})
        assert again.status_code == 400
        nowhere = _post(lora_url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/no/such/dir"})
        assert nowhere.status_code == 400
        assert _post(lora_url, "/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 200
        assert [m.id for m in client.models.list().data] == [lora_state.settings.model_name]
        assert _post(lora_url, "/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="a", prompt="w3 w7", max_tokens=5)


def test_routing_errors_and_model_retrieval(server):
    url, state = server
    missing = httpx.get(url + "/v1/nothing-here")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong = httpx.get(url + "/v1/chat/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]
    anthropic_shape = httpx.get(url + "/v1/messages")
    assert anthropic_shape.json()["type"] == "error"
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve(state.settings.model_name).id == state.settings.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
