"""edgellm.server through the official `openai` client against a real uvicorn server on 127.0.0.1: every
answer equals handle_request's for the same request (chat and completions, streamed or not, n, adapters
chosen by `model`, stop strings, seeds); streams have OpenAI's shape; /v1/models, /health, /metrics."""

import json

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime

from http_server import httpx, running_server

pytestmark = pytest.mark.reference_ops

PROMPT = "w3 w7 w11 w19 w23"
CHAT = [{"role": "system", "content": "w40 w52"}, {"role": "user", "content": "w3 w7 w11"}]


@pytest.fixture(scope="module")
def runtime(tiny_models, lora_adapters):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=4, prefill_budget=8,
                               lora_weights={"a": lora_adapters["a"][0], "b": lora_adapters["b"][0]})


@pytest.fixture(scope="module")
def server(runtime):
    with running_server(runtime) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(runtime, item, n=1, **settings):
    return runtime.handle_request(LLMGenerationRequest(requests=[item] * n, **settings))


def test_chat_completion_equals_handle_request(runtime, client, server):
    expected = _alone(runtime, {"messages": CHAT}, max_generate_length=9, temperature=0, lora_weights_name="")
    got = client.chat.completions.create(model=server[1].settings.model_name, messages=CHAT, max_tokens=9,
                                         temperature=0)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.model == server[1].settings.model_name
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.output_texts[0]
    assert choice.finish_reason == expected.finish_reasons[0]
    assert got.usage.prompt_tokens == expected.prompt_lengths[0]
    assert got.usage.completion_tokens == len(expected.output_ids[0])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_with_openai_chunks(runtime, client):
    expected = _alone(runtime, {"messages": CHAT}, max_generate_length=12, temperature=0.9, top_k=0, seed=5,
                      lora_weights_name="")
    chunks = list(client.chat.completions.create(model=client_model(client), messages=CHAT, max_completion_tokens=12, temperature=0.9, seed=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.output_texts[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reasons[0]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.output_ids[0])
    assert all(c.usage is None for c in chunks[:-1])


def client_model(client) -> str:
    return client.models.list().data[0].id


def test_completions_n_and_prompt_lists_follow_handle_request(runtime, client):
    model = client_model(client)
    expected = _alone(runtime, {"prompt": PROMPT}, n=2, max_generate_length=8, temperature=1.0, top_k=0, seed=11,
                      lora_weights_name="")
    got = client.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == expected.output_texts
    assert got.usage.prompt_tokens == expected.prompt_lengths[0]  # (the prompt once, for both choices)
    greedy = client.completions.create(model=model, prompt=[PROMPT, "w5 w6"], n=2, max_tokens=6, temperature=0)
    one = _alone(runtime, {"prompt": PROMPT}, max_generate_length=6, temperature=0, lora_weights_name="")
    two = _alone(runtime, {"prompt": "w5 w6"}, max_generate_length=6, temperature=0, lora_weights_name="")
    assert [c.text for c in greedy.choices] == one.output_texts * 2 + two.output_texts * 2


def test_streamed_completion_with_n_gives_each_choice_its_text(runtime, client):
    expected = _alone(runtime, {"prompt": PROMPT}, n=2, max_generate_length=10, temperature=1.2, top_k=0, seed=3,
                      lora_weights_name="")
    texts, finishes = ["", ""], {}
    for chunk in client.completions.create(model=client_model(client), prompt=PROMPT, n=2, max_tokens=10,
                                           temperature=1.2, seed=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == expected.output_texts
    assert finishes == dict(enumerate(expected.finish_reasons))


def test_model_picks_the_adapter(runtime, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == ["a", "b"]
    for name in ("a", "b"):
        expected = _alone(runtime, {"prompt": PROMPT}, max_generate_length=8, temperature=0, lora_weights_name=name)
        got = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.choices[0].text == expected.output_texts[0] and got.model == name
    base = client.completions.create(model=ids[0], prompt=PROMPT, max_tokens=8, temperature=0)
    assert base.choices[0].text == _alone(runtime, {"prompt": PROMPT}, max_generate_length=8, temperature=0,
                                          lora_weights_name="").output_texts[0]


def test_stop_strings_and_token_id_prompts(runtime, client):
    model = client_model(client)
    free = _alone(runtime, {"prompt": PROMPT}, max_generate_length=10, temperature=0, lora_weights_name="")
    words = free.output_texts[0].split()
    stop = words[2] if len(words) > 2 else words[-1]
    expected = _alone(runtime, {"prompt": PROMPT}, max_generate_length=10, temperature=0, stop=[stop],
                      lora_weights_name="")
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop)
    assert got.choices[0].text == expected.output_texts[0] and got.choices[0].finish_reason == "stop"
    ids = [1, 17, 33, 8]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == _alone(runtime, {"input_ids": ids}, max_generate_length=5, temperature=0,
                                            lora_weights_name="").output_texts[0]


def test_max_tokens_left_out_runs_to_the_kv_capacity(runtime, client):
    got = client.chat.completions.create(model=client_model(client), messages=CHAT, temperature=0)
    expected = _alone(runtime, {"messages": CHAT}, max_generate_length=None, temperature=0, lora_weights_name="")
    assert got.choices[0].message.content == expected.output_texts[0]
    room = runtime.config.max_kv_cache_capacity - expected.prompt_lengths[0]
    assert got.choices[0].finish_reason == "stop" or got.usage.completion_tokens == room


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_health_models_and_metrics(server, client):
    url, state = server
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ready" and health["waiting"] == 0 and health["running"] == 0
    model = client.models.list().data[0]
    assert model.id == state.settings.model_name and model.owned_by == "edgellm"
    client.completions.create(model=model.id, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("edgellm_requests_total", "edgellm_queue_depth", "edgellm_running_rows",
                 "edgellm_prompt_tokens_total", "edgellm_generation_tokens_total",
                 "edgellm_time_to_first_token_seconds_bucket", "edgellm_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert 'edgellm_requests_total{endpoint="completions",status="200"}' in text


def test_penalties_logit_bias_and_min_p_follow_handle_request(runtime, client):
    model = client_model(client)
    settings = dict(presence_penalty=0.8, frequency_penalty=0.5, logit_bias={12: 3.0, 40: -100.0})
    extras = dict(repetition_penalty=1.4, min_p=0.1, top_k=0)
    expected = _alone(runtime, {"messages": CHAT}, max_generate_length=10, temperature=0.8, seed=4,
                      lora_weights_name="", **settings, **extras)
    got = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=10, temperature=0.8, seed=4, presence_penalty=0.8,
        frequency_penalty=0.5, logit_bias={"12": 3.0, "40": -100.0}, extra_body=extras)
    assert got.choices[0].message.content == expected.output_texts[0]
    plain = _alone(runtime, {"messages": CHAT}, max_generate_length=10, temperature=0.8, seed=4, top_k=0,
                   lora_weights_name="")
    assert expected.output_ids != plain.output_ids  # (the settings change this answer)
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"33": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text.replace(" ", "") == "w27" * 4  # (token 33 is the word w27)


def test_logprobs_in_chat_and_completions_streamed_or_not(runtime, client):
    """choice.logprobs in OpenAI's shapes, each value the runtime's (itself transformers' log-softmax:
    tests/engine/test_logit_processing.py), and the streamed chunks' logprobs joined equal to the whole."""
    model = client_model(client)
    expected = _alone(runtime, {"messages": CHAT}, max_generate_length=6, temperature=0, logprobs=3,
                      lora_weights_name="")
    text_of = lambda t: runtime.tokenizer.decode([t])  # noqa: E731
    got = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert [c.token for c in content] == [text_of(t.token) for t in expected.logprobs[0]]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in expected.logprobs[0]], abs=1e-5)
    assert [[a.token for a in c.top_logprobs] for c in content] == \
        [[text_of(i) for i, _ in t.top] for t in expected.logprobs[0]]
    assert content[0].bytes == list(content[0].token.encode())
    streamed = [entry for chunk in client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    reference = _alone(runtime, {"prompt": PROMPT}, max_generate_length=5, temperature=0, logprobs=2,
                       lora_weights_name="").logprobs[0]
    assert lp.tokens == [text_of(t.token) for t in reference]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in reference], abs=1e-5)
    assert [len(top) for top in lp.top_logprobs] == [2] * 5
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
def test_fast_text_chunks_equal_the_chunk_objects_encoded(chat, include_usage):
    from edgellm.server import openai_api

    job = openai_api.Job(LLMGenerationRequest(requests=[{"prompt": "x"}]), 'mo"del/é', 1, True, include_usage, "id-1")
    for text in ("plain", 'quotes " and \\ and \n', "émoji 🎉", ""):
        expected = openai_api.chat_chunk(job, 3, {"content": text}) if chat else openai_api.completion_chunk(job, 3, text)
        line = openai_api.TextChunks(job, chat).sse(3, text)
        assert line == "data: " + json.dumps(expected, ensure_ascii=False, separators=(",", ":")) + "\n\n"
