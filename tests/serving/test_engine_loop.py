"""Continuous batching (edgellm/serving/engine_loop.py) through the runtime: requests from many threads
share the running batch and each gets the answer it gets alone (prompts, lengths, sampling settings,
seeds, stop strings and adapters all differing); a cancelled request frees its slot; a full cache makes
requests wait; a request that arrives while a long prompt prefills in chunks; the bounded queue;
submit()'s handle. On the CPU through the torch references (the loop runs its steps under the
submitting thread's use_reference)."""

import random
import threading
import time

import pytest

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import ConfigurationError, InvalidRequestError, QueueFullError, RequestCancelledError
from edgellm.kernels import use_reference

from test_threads import (check_interrupted_request_leaves_runtime_usable, check_threads_match_one_by_one,
                          lora_side_calls, mixed_requests)

pytestmark = pytest.mark.reference_ops

THREADS, REQUESTS = 6, 30
WORDS = ["w3", "w7", "w11", "w19", "w23", "w40", "w52", "w61", "w77", "w88"]


@pytest.fixture(scope="module")
def runtime(tiny_models, lora_adapters):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=4, prefill_budget=8,
                               lora_weights={"a": lora_adapters["a"][0], "b": lora_adapters["b"][0]})


def _varied_requests(seed=0):
    """REQUESTS requests of one item each: text prompts of 2-30 words, 3-12 tokens, greedy or seeded
    sampling (temperature, top-k, top-p), some with a stop string, on adapter a, b or the base model."""
    rng = random.Random(seed)
    requests = []
    for n in range(REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        sampling = dict(temperature=0) if n % 3 == 0 else dict(temperature=rng.choice([0.7, 1.0, 1.4]),
                                                                 top_k=rng.choice([0, 5, 40]),
                                                                 top_p=rng.choice([0.8, 1.0]), seed=n)
        stop = [rng.choice(WORDS)] if n % 4 == 1 else None
        requests.append(LLMGenerationRequest(requests=[{"prompt": prompt}], max_generate_length=rng.randint(3, 12),
                                             stop=stop, lora_weights_name=["a", "b", ""][n % 3], **sampling))
    return requests


def _answer(response):
    return response.output_ids, response.output_texts, response.finish_reasons


def check_threads_at_random_times(runtime, settings=use_reference) -> None:
    """_varied_requests from THREADS threads at random times, each thread in `settings()` (the kernels'
    run settings its requests' steps take): every answer that of the same request alone, the requests
    overlapping in the batch, prompts prefilled in mixed steps beside decoding rows, every slot back."""
    requests = _varied_requests()
    with settings():
        alone = [_answer(runtime.handle_request(r)) for r in requests]
    got, errors, spans = [None] * len(requests), [], [None] * len(requests)
    mine = [list(range(t, len(requests), THREADS)) for t in range(THREADS)]
    mixed = runtime._loop.step_counts["mixed"]

    def worker(t):
        rng = random.Random(t)
        try:
            with settings():
                handles = []
                for n in mine[t]:
                    time.sleep(rng.uniform(0, 0.05))
                    handles.append((n, runtime.submit(requests[n])))
                for n, handle in handles:
                    got[n] = _answer(handle.result(timeout=300))
                    spans[n] = (handle.sequences[0].admitted, handle.sequences[0].finished)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert got == alone
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    assert overlapping >= len(requests)  # they did share the batch
    assert runtime._loop.step_counts["mixed"] - mixed >= len(requests) // 2
    assert runtime._loop.scheduler.idle and not runtime._loop.batch
    assert sorted(runtime._loop.scheduler.free) == list(range(runtime.config.max_supported_batch_size))


def test_threads_submitting_at_random_times_get_the_answers_of_one_by_one(runtime):
    check_threads_at_random_times(runtime)


def test_speculating_rows_share_the_batch_and_give_the_plain_answers(tiny_models, lora_adapters, runtime):
    """n-gram speculation per row on the loop: the threads check holds with verify steps among the
    steps (each request's own proposer, rows without drafts taking their plain token in the same step),
    drafts are accepted, and every answer equals the runtime's without speculation (same seeds)."""
    from edgellm import SpeculativeConfig

    speculating = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=4, prefill_budget=8,
                                      lora_weights={"a": lora_adapters["a"][0], "b": lora_adapters["b"][0]},
                                      speculative=SpeculativeConfig(method="ngram", max_verify_tokens=6))
    check_threads_at_random_times(speculating)
    assert speculating._loop.step_counts["verify"] > 0
    with use_reference():
        plain = [_answer(runtime.handle_request(r)) for r in _varied_requests()]
        responses = [speculating.handle_request(r) for r in _varied_requests()]
    assert [_answer(r) for r in responses] == plain
    assert sum(r.speculative.accepted for r in responses) > 0
    assert all(len(r.speculative.accepted_flags[0]) == len(r.output_ids[0]) for r in responses)


def test_the_thread_harness_with_adapters_loading_beside(runtime, lora_adapters):
    """tests/test_threads.py's check on the loop: 8 threads of mixed requests (batches of 1-3 items,
    streamed ones among them) while another thread loads, switches and removes an adapter."""
    check_threads_match_one_by_one(runtime, mixed_requests(), lora_side_calls(runtime, lora_adapters["a"][0]))


def test_a_request_arriving_while_a_long_prompt_prefills(runtime):
    """While a row decodes, a 300-token prompt prefills 8 tokens a step beside it (mixed steps); a
    short request submitted meanwhile joins, decodes beside them and gets its answer alone; so do the
    long one and the row that was decoding."""
    running = LLMGenerationRequest(requests=[{"input_ids": [1, 40, 12, 9]}], max_generate_length=90, temperature=0)
    long = LLMGenerationRequest(requests=[{"input_ids": [1] + [5 + (i * 7) % 80 for i in range(299)]}],
                                max_generate_length=6, temperature=0)
    short = LLMGenerationRequest(requests=[{"input_ids": [1, 50, 6]}], max_generate_length=8, temperature=0.8,
                                 seed=3)
    with use_reference():
        alone = [_answer(runtime.handle_request(r)) for r in (running, long, short)]
        mixed = runtime._loop.step_counts["mixed"]
        running_handle = runtime.submit(running)
        while not running_handle.sequences[0].row.ids:
            time.sleep(0.001)
        long_handle = runtime.submit(long)
        while long_handle.sequences[0].prefilled == 0:
            time.sleep(0.001)
        short_handle = runtime.submit(short)
        short_answer = _answer(short_handle.result(timeout=300))
        assert long_handle.sequences[0].prefilled < 300  # the short one finished while the long prompt prefilled
        assert not running_handle.done()
        assert [_answer(running_handle.result(timeout=300)), _answer(long_handle.result(timeout=300)),
                short_answer] == alone
    assert runtime._loop.step_counts["mixed"] - mixed >= 300 // 8


def test_a_full_cache_makes_requests_wait_and_a_cancelled_one_frees_its_slot(runtime):
    """Four slots: six long requests fill them, two wait; cancelling one running request lets a
    waiting one in; every other answer is its answer alone; the cancelled handle raises."""
    requests = [LLMGenerationRequest(requests=[{"input_ids": [1, 10 + n, 20 + n]}], max_generate_length=40,
                                     temperature=0, seed=n) for n in range(6)]
    with use_reference():
        alone = [_answer(runtime.handle_request(r)) for r in requests]
        handles = [runtime.submit(r) for r in requests]
        scheduler = runtime._loop.scheduler
        while len(scheduler.running) < 4:
            time.sleep(0.001)
        assert len(scheduler.waiting) == 2 and all(h.sequences[0].slot is None for h in handles[4:])
        handles[1].cancel()
        answers = [_answer(h.result(timeout=300)) for i, h in enumerate(handles) if i != 1]
    assert answers == [a for i, a in enumerate(alone) if i != 1]
    with pytest.raises(RequestCancelledError):
        handles[1].result()
    assert handles[1].done() and sorted(scheduler.free) == list(range(4))


def test_a_failing_step_fails_the_requests_in_flight_and_leaves_the_loop_usable(tiny_models):
    """A step that raises (here the engine's mixed step, made to fail once, as a lost device would):
    every request in flight and waiting gets that error from result(), nothing is left in the batch or
    the slots, and the next requests get their answers alone."""
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2, prefill_budget=4)
    requests = [LLMGenerationRequest(requests=[{"input_ids": [1, 10 + n, 20 + n, 30 + n, 40 + n, 50 + n]}],
                                     max_generate_length=40, temperature=0) for n in range(3)]
    runner = runtime.runner
    launch = runner.mixed_launch
    failures = []

    def fails_once(*args, **kwargs):
        if not failures:
            failures.append(RuntimeError("the device went away"))
            raise failures[0]
        return launch(*args, **kwargs)

    with use_reference():
        alone = [_answer(runtime.handle_request(r)) for r in requests]
        runner.mixed_launch = fails_once
        try:
            first = runtime.submit(requests[0])
            while not first.sequences[0].row.ids:  # decoding: the next prompt prefills in a mixed step
                time.sleep(0.001)
            handles = [first] + [runtime.submit(r) for r in requests[1:]]
            for handle in handles:
                with pytest.raises(RuntimeError, match="the device went away"):
                    handle.result(timeout=300)
        finally:
            del runner.mixed_launch
        loop = runtime._loop
        assert loop.scheduler.idle and not loop.batch and sorted(loop.scheduler.free) == [0, 1]
        assert [_answer(runtime.handle_request(r)) for r in requests] == alone


def test_a_streaming_callback_may_make_a_request_of_its_own(runtime):
    """on_text runs on the caller's thread, not the loop's: a request made from it simply joins the batch."""
    request = LLMGenerationRequest(requests=[{"input_ids": [1, 50, 6]}], max_generate_length=4, temperature=0)
    with use_reference():
        alone = runtime.handle_request(request).output_ids
        nested = []
        outer = runtime.handle_request(request, on_text=lambda i, d: nested.append(
            runtime.handle_request(request).output_ids))
    assert outer.output_ids == alone and nested and all(ids == alone for ids in nested)


@pytest.mark.parametrize("interrupt", [RuntimeError("client went away"), KeyboardInterrupt()])
def test_a_request_interrupted_from_its_callback_leaves_the_loop_usable(runtime, interrupt):
    check_interrupted_request_leaves_runtime_usable(runtime, interrupt, adapter="a")


def test_stream_and_result(runtime):
    request = LLMGenerationRequest(requests=[{"prompt": "w3 w7 w11"}, {"prompt": "w40"}], max_generate_length=6,
                                   temperature=0)
    with use_reference():
        handle = runtime.submit(request)
        pieces = {}
        for item, text in handle.stream():
            pieces[item] = pieces.get(item, "") + text
        response = handle.result()
    assert [pieces.get(i, "") for i in range(2)] == response.output_texts
    assert handle.done() and response.timings.total_ms >= response.timings.queue_ms >= 0
    handle.cancel()  # done: no effect
    assert handle.result() is response


def test_bad_submissions_fail_before_any_work(tiny_models, runtime):
    with pytest.raises(InvalidRequestError, match="priority"):
        runtime.submit(LLMGenerationRequest(requests=[{"input_ids": [1, 2]}]), priority="high")
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        runtime.submit(LLMGenerationRequest(requests=[{"input_ids": [1, 10 ** 6]}]))
    with pytest.raises(ConfigurationError, match="max_queued"):
        LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_queued=0)
    bounded = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=1, max_queued=2)
    request = LLMGenerationRequest(requests=[{"input_ids": [1, 2, 3]}], max_generate_length=30, temperature=0)
    with use_reference():
        first = bounded.submit(request)
        while first.sequences[0].slot is None:
            time.sleep(0.001)
        waiting = [bounded.submit(request), bounded.submit(request)]
        with pytest.raises(QueueFullError, match="max_queued 2"):
            bounded.submit(request)
        assert [_answer(h.result(timeout=300)) for h in [first] + waiting] == [_answer(first.result())] * 3


def test_no_memory_growth_over_2000_requests(runtime):
    """2000 short requests, 8 at a time: after the first 200, what Python holds grows by under 256 KiB,
    and the loop keeps no handle, row or step of a finished request."""
    import gc
    import tracemalloc

    request = LLMGenerationRequest(requests=[{"input_ids": [1, 50, 6]}], max_generate_length=2, temperature=0)

    def burst(count):
        for _ in range(count // 8):
            handles = [runtime.submit(request) for _ in range(8)]
            for handle in handles:
                handle.result(timeout=60)

    with use_reference():
        burst(200)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        burst(1800)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    loop = runtime._loop
    assert grown < 256 << 10, f"{grown} bytes more after 1800 requests"
    assert not loop._handles and not loop.batch and not loop._in_flight and loop.scheduler.idle



def test_n_choices_of_one_prompt_prefill_it_once(runtime):
    """Items of one request with the same prompt (an API's n): the first prefills it, the others copy its
    KV and prefill only the last token; each choice equals the same item alone with its own seed."""
    from edgellm.requests import SamplingSettings, item_seeds

    prompt = " ".join(WORDS * 3)
    settings = dict(temperature=1.1, top_k=0, seed=21, max_generate_length=9)
    shared = runtime._loop.shared_prompt_tokens
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"prompt": prompt}] * 3, **settings))
    length = response.prompt_lengths[0]
    assert runtime._loop.shared_prompt_tokens - shared == 2 * (length - 1)
    seeds = item_seeds(SamplingSettings(1.1, 0, 1.0, 21), 3)
    alone = [runtime.handle_request(LLMGenerationRequest(requests=[{"prompt": prompt}], **{**settings, "seed": seed}))
             for seed in seeds]
    assert response.output_ids == [a.output_ids[0] for a in alone]
    assert len({tuple(ids) for ids in response.output_ids}) > 1  # (three seeds, not one answer thrice)
