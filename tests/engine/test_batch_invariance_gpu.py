"""Deterministic decoding on CUDA in float16 (issue: batch-invariant decoding). With Switches.batch_invariant
a row's logits are bitwise the same at every step (its prefill's and each decode step's) alone and in
batches of 2, 3, 8 and 16 with other neighbours at other places, and after a reused prefix as after a
cold prefill; by default the same batch run twice gives the same bits (64 seeded requests through the
runtime too); under continuous batching with random arrivals every request gets what it gets alone
(deterministic=True). Random-weight SmolLM2-135M and Llama-3.2-1B shapes and the real default model (the
runner), the tiny llama and the default model (the runtime, with their tokenizers)."""

import random
import threading
import time

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.benchmark import random_model_dir
from edgellm.engine.runner import LLMEngineRunner
from edgellm.engine.switches import Switches
from edgellm.errors import DefaultModelUnavailableError
from edgellm.requests import SamplingSettings, item_seeds

pytestmark = pytest.mark.gpu
STEPS = 12


@pytest.fixture(scope="module", params=["smollm2-135m", "llama-3.2-1b", "default"])
def shape_dir(request, tmp_path_factory):
    """Random-weight shapes, and the real default model (its GGUF converted: bench/RESULTS.md says how it
    reaches the device)."""
    if request.param == "default":
        return _default_model(request)
    return random_model_dir(request.param, tmp_path_factory.mktemp("shapes"))


def _default_model(request):
    try:
        return request.getfixturevalue("default_model_dir")
    except DefaultModelUnavailableError as exc:  # (the device has no internet: its GGUF is carried there)
        pytest.skip(f"the default model is not on this machine ({exc}); bench/RESULTS.md says how to carry its GGUF")


def _runner(model_dir, invariant: bool):
    return LLMEngineRunner(model_dir, device="cuda", dtype="float16", max_batch_size=16, max_input_length=320,
                           max_kv_cache_capacity=512, switches=Switches(batch_invariant=invariant))


def _prompts(n, seed, vocab=49152):  # (within both shapes' vocabularies)
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(5, 300))] for _ in range(n)]


def _run(runner, prompts, *, sampled=False, steps=STEPS):
    """Every row's logits at each step ([steps + 1, rows, vocab]: its prefill's, then each decode step's)
    and tokens, the prompts prefilled together in slots 0..n-1, then decoded together."""
    n = len(prompts)
    slots = list(range(n))
    logits = [runner.prefill_tokens(prompts, slots=slots).clone()]
    settings = ([0.8] * n, [40] * n, [0.9] * n) if sampled else ([0.0] * n, [0] * n, [1.0] * n)
    seeds = [7 + i for i in range(n)]
    first = runner.sample(logits[0], *[torch.tensor(v, device="cuda") for v in settings],
                          torch.tensor(seeds, device="cuda"), torch.zeros(n, dtype=torch.int64, device="cuda"))
    tokens = [first.tolist()]
    runner.start_decode(first, slots, *settings, seeds, [0] * n)
    for _ in range(steps):
        tokens.append(runner.decode_sample_step().tolist())
        logits.append(runner.decode_logits().clone())
    runner.end_decode()
    return torch.stack(logits), tokens


def test_a_row_has_the_same_logits_alone_and_in_any_batch(shape_dir):
    runner = _runner(shape_dir, invariant=True)
    target = _prompts(1, seed=1)[0]
    alone, _ = _run(runner, [target])
    for size, seed in ((2, 2), (3, 3), (8, 4), (16, 5), (16, 6)):
        prompts = _prompts(size, seed)
        at = seed % size  # another place each time
        prompts[at] = target
        logits, _ = _run(runner, prompts)
        assert torch.equal(logits[:, at], alone[:, 0]), f"batch of {size}, row {at}"


def test_the_same_batch_twice_gives_the_same_bits(shape_dir):
    """By default (no batch invariance): seeded sampled rows, run twice on one runner."""
    runner = _runner(shape_dir, invariant=False)
    prompts = _prompts(8, seed=8)
    first, first_tokens = _run(runner, prompts, sampled=True)
    again, again_tokens = _run(runner, prompts, sampled=True)
    assert first_tokens == again_tokens
    assert torch.equal(first, again)


def test_a_reused_prefix_gives_the_cold_prefill_logits(shape_dir):
    """A prompt's prefill after its first 128 tokens were prefilled for another, shorter prompt (what a
    KV-reuse hit restores) against the whole prompt prefilled cold; and after an unaligned prefix of 77."""
    runner = _runner(shape_dir, invariant=True)
    prompt = _prompts(1, seed=9)[0] + _prompts(1, seed=10)[0]
    prompt = (prompt * 2)[:260]
    cold = runner.prefill_tokens([prompt], slots=[0]).clone()
    for cut in (128, 77):
        runner.prefill_tokens([prompt[:cut]], slots=[1])
        hit = runner.prefill_tokens([prompt], slots=[1], cached_lengths=[cut])
        assert torch.equal(hit, cold), f"prefix of {cut}"


def test_64_seeded_sampled_requests_twice_give_the_same_tokens(tiny_models):
    """By default, through the runtime: 64 items of one request (sampled, each its own seed), twice."""
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cuda", dtype="float16", max_batch_size=64)
    rng = random.Random(1)
    items = [{"prompt": " ".join(rng.choice(["w3", "w7", "w40", "w52", "w88"]) for _ in range(rng.randint(2, 40)))}
             for _ in range(64)]
    request = dict(requests=items, max_generate_length=24, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    first = runtime.handle_request(LLMGenerationRequest(**request)).output_ids
    assert runtime.handle_request(LLMGenerationRequest(**request)).output_ids == first
    assert len({tuple(ids) for ids in first}) > 32  # (the seeds differ per item: the rows do too)


def test_requests_arriving_at_random_get_what_they_get_alone(tiny_models):
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cuda", dtype="float16", max_batch_size=8,
                                  deterministic=True)
    rng = random.Random(0)
    words = ["w3", "w7", "w11", "w19", "w23", "w40", "w52", "w61", "w77", "w88"]
    requests = [LLMGenerationRequest(requests=[{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))}],
                                     max_generate_length=rng.randint(4, 24), temperature=0.8, top_k=40, top_p=0.9,
                                     seed=n) for n in range(200)]
    alone = [runtime.handle_request(r).output_ids for r in requests]
    got, errors = [None] * len(requests), []

    def worker(t):
        try:
            handles = []
            for n in range(t, len(requests), 8):
                time.sleep(rng.uniform(0, 0.01))
                handles.append((n, runtime.submit(requests[n])))
            for n, handle in handles:
                got[n] = handle.result(timeout=300).output_ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sum(a == b for a, b in zip(got, alone)) == len(requests)
    assert runtime._loop.step_counts["decode"] > 0 and runtime._loop.step_counts["mixed"] == 0


def test_the_default_model_answers_alike_alone_batched_and_twice(request):
    """The real default model through the runtime, deterministic=True: 16 sampled chat prompts (each its
    own seed) alone, then all in one request, then that request again: the same tokens every time."""
    runtime = LLMInferenceRuntime(_default_model(request), device="cuda", dtype="float16", max_batch_size=16,
                                  deterministic=True)
    topics = ["the sea", "a train", "bread", "winter", "a lighthouse", "chess", "rain", "a violin"]
    items = [{"messages": [{"role": "user", "content": f"Write two sentences about {topics[i % 8]}."}]}
             for i in range(16)]
    settings = dict(max_generate_length=32, temperature=0.8, top_k=40, top_p=0.9)
    seeds = item_seeds(SamplingSettings(0.8, 40, 0.9, 7), len(items))  # (item i's seed inside the batch)
    alone = [runtime.handle_request(LLMGenerationRequest(requests=[item], seed=seed, **settings)).output_ids[0]
             for item, seed in zip(items, seeds)]
    batched = runtime.handle_request(LLMGenerationRequest(requests=items, seed=7, **settings)).output_ids
    assert batched == alone
    assert runtime.handle_request(LLMGenerationRequest(requests=items, seed=7, **settings)).output_ids == batched
    assert len({tuple(ids) for ids in alone}) > 8
