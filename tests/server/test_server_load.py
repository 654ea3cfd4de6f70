"""The server under concurrent clients and departures: 32 clients x 4 requests on loopback (streamed and
not, greedy and seeded, varied lengths), none lost, failed or answered twice, each answer the one
handle_request gives alone; a client that disconnects mid-stream frees its slot; an image request on a
tiny vision-language model; `edgellm serve` as a process: ready, serving, and exit 0 on SIGTERM."""

import base64
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the dev extra's openai client (the GPU machine has none)")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime

from http_server import free_port, httpx, running_server

pytestmark = pytest.mark.reference_ops

CLIENTS, PER_CLIENT = 32, 4


@pytest.fixture(scope="module")
def runtime(tiny_models):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=4, prefill_budget=8)


def _requests(seed=0):
    rng = random.Random(seed)
    out = []
    for n in range(CLIENTS * PER_CLIENT):
        prompt = " ".join(f"w{rng.randint(3, 80)}" for _ in range(rng.randint(2, 12)))
        sampling = {"temperature": 0} if n % 2 else {"temperature": 0.9, "seed": n}
        out.append(dict(prompt=prompt, max_tokens=rng.randint(2, 8), stream=n % 3 == 0, **sampling))
    return out


def _alone(runtime, spec):
    return runtime.handle_request(LLMGenerationRequest(
        requests=[{"prompt": spec["prompt"]}], max_generate_length=spec["max_tokens"], temperature=spec["temperature"],
        top_k=0, seed=spec.get("seed"), lora_weights_name="")).output_texts[0]


def test_concurrent_clients_get_their_own_answers(runtime):
    specs = _requests()
    expected = [_alone(runtime, spec) for spec in specs]
    got, errors = [None] * len(specs), []
    with running_server(runtime) as (url, state):
        def client_thread(c):
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
            for k in range(PER_CLIENT):
                i = c * PER_CLIENT + k
                spec = dict(specs[i])
                try:
                    if spec.pop("stream"):
                        chunks = client.completions.create(model=state.settings.model_name, stream=True, **spec)
                        got[i] = "".join(choice.text for chunk in chunks for choice in chunk.choices)
                    else:
                        got[i] = client.completions.create(model=state.settings.model_name, **spec).choices[0].text
                except Exception as exc:  # noqa: BLE001 (collected and asserted below)
                    errors.append((i, repr(exc)))

        threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(CLIENTS)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, 300 - (time.monotonic() - began)))
        assert not any(thread.is_alive() for thread in threads), "the load test ran past its bound"
        metrics = httpx.get(url + "/metrics").text
        stats = runtime.serving_stats()
    assert errors == []
    assert got == expected
    assert stats["waiting"] == 0 and stats["running"] == 0
    assert f'edgellm_requests_total{{endpoint="completions",status="200"}} {float(len(specs))}' in metrics


def test_a_client_leaving_mid_stream_frees_its_slot(runtime):
    with running_server(runtime) as (url, state):
        body = {"model": state.settings.model_name, "prompt": "w3 w4 w5", "max_tokens": 900, "temperature": 0.7,
                "top_k": 0, "seed": 1, "stream": True}
        decode_steps = runtime.serving_stats()["steps"].get("decode", 0)
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 30
        while runtime.serving_stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = runtime.serving_stats()
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["steps"].get("decode", 0) - decode_steps < 900 - 1  # cancelled, not run to its end
        deadline = time.monotonic() + 10
        while 'status="499"' not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'edgellm_requests_total{endpoint="completions",status="499"} 1.0' in httpx.get(url + "/metrics").text
        assert httpx.get(url + "/health").json()["running"] == 0


def test_image_request_on_a_tiny_vision_model(tmp_path):
    from vlm_models import build_vlm, random_image

    build_vlm("qwen2_5_vl", tmp_path / "vlm")
    vlm = LLMInferenceRuntime(tmp_path / "vlm", device="cpu", max_batch_size=2)
    image = random_image(40, 40)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    expected = vlm.handle_request(LLMGenerationRequest(requests=[{"messages": [{"role": "user", "content": [
        {"type": "image", "image": buffer.getvalue()}, {"type": "text", "text": "w3 w4"}]}]}], max_generate_length=6,
        temperature=0))
    with running_server(vlm) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        got = client.chat.completions.create(model=state.settings.model_name, max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "w3 w4"}]}])
    assert got.choices[0].message.content == expected.output_texts[0]
    assert got.usage.prompt_tokens == expected.prompt_lengths[0]


def test_serve_command_is_ready_serves_and_drains_on_sigterm(llama_dir):
    port = free_port()
    # (Without TRITON_INTERPRET the CPU runs the ops' torch references: this test is about the process.)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(llama_dir), "--port", str(port),
                                "--device", "cpu", "--max-batch-size", "2", "--served-model-name", "tiny"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, deadline, health = f"http://127.0.0.1:{port}", time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(url + "/health", timeout=5).json()
            except httpx.TransportError:
                health = None
            if health and health["status"] == "ready":
                break
            time.sleep(0.2)
        assert health and health["status"] == "ready", process.stdout.read() if process.poll() is not None else health
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user",
                                                                                     "content": "w3 w4"}])
        assert answer.choices[0].message.content is not None and answer.model == "tiny"
        body = {"model": "tiny", "prompt": "w3 w4", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)  # (while the stream is in flight: it finishes first)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"tiny ready at http://127.0.0.1:{port}/v1" in output and "draining 1 request(s)" in output
