"""/v1/messages through the official `anthropic` client against a real uvicorn server: the answer and the
streamed events equal handle_request's for the same request; system prompts, stop sequences and their
stop reasons; Anthropic's error shape. (This client's release no longer sends sampling settings itself:
temperature and seed go as extra_body fields, which the server takes as the API's older releases did.)"""

import pytest

anthropic = pytest.importorskip("anthropic", reason="the dev extra's anthropic client (the GPU machine has none)")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime

from http_server import running_server

pytestmark = pytest.mark.reference_ops

SYSTEM = "w40 w52"
MESSAGES = [{"role": "user", "content": "w3 w7 w11"}, {"role": "assistant", "content": "w9"},
            {"role": "user", "content": [{"type": "text", "text": "w13 w17"}]}]
TEMPLATED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w3 w7 w11"},
             {"role": "assistant", "content": "w9"}, {"role": "user", "content": "w13 w17"}]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=4, prefill_budget=8)


@pytest.fixture(scope="module")
def server(runtime):
    with running_server(runtime) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def _alone(runtime, **settings):
    return runtime.handle_request(LLMGenerationRequest(requests=[{"messages": TEMPLATED}], **settings))


def test_message_equals_handle_request(runtime, server, client):
    expected = _alone(runtime, max_generate_length=9, temperature=0)
    got = client.messages.create(model=server[1].settings.model_name, system=SYSTEM, messages=MESSAGES,
                                 max_tokens=9, extra_body={"temperature": 0})
    assert got.type == "message" and got.role == "assistant" and got.id.startswith("msg_")
    assert [block.type for block in got.content] == ["text"]
    assert got.content[0].text == expected.output_texts[0]
    assert got.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[expected.finish_reasons[0]]
    assert got.usage.input_tokens == expected.prompt_lengths[0]
    assert got.usage.output_tokens == len(expected.output_ids[0])


def test_streamed_message_events_equal_the_whole_answer(runtime, server, client):
    expected = _alone(runtime, max_generate_length=12, temperature=0.8, top_k=0, seed=9)
    with client.messages.stream(model=server[1].settings.model_name, system=SYSTEM, messages=MESSAGES,
                                max_tokens=12, extra_body={"temperature": 0.8, "seed": 9}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == expected.output_texts[0] == final.content[0].text
    assert final.usage.output_tokens == len(expected.output_ids[0])


def test_stop_sequence_is_reported(runtime, server, client):
    free = _alone(runtime, max_generate_length=10, temperature=0)
    words = free.output_texts[0].split()
    stop = words[min(2, len(words) - 1)]
    got = client.messages.create(model=server[1].settings.model_name, system=SYSTEM, messages=MESSAGES,
                                 max_tokens=10, stop_sequences=["never-there", stop], extra_body={"temperature": 0})
    expected = _alone(runtime, max_generate_length=10, temperature=0, stop=["never-there", stop])
    assert got.content[0].text == expected.output_texts[0]
    assert got.stop_reason == "stop_sequence" and got.stop_sequence == stop


def test_errors_have_anthropics_shape(server, client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=server[1].settings.model_name, messages=MESSAGES, max_tokens=4,
                               extra_body={"temperature": 1.5})
    assert "temperature" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=server[1].settings.model_name, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert "does not fetch" in caught.value.body["error"]["message"]
