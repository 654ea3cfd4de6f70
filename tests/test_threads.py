"""Several threads on one runtime: each request gets exactly the answer it gets alone; calls take
turns in arrival order; a request cut short (an exception from its streaming callback, a
KeyboardInterrupt) leaves the runtime as it was. On a GPU the same checks run under CUDA graphs (marker gpu, below)."""

import threading
import time

import pytest
import torch

from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.fifo_lock import FifoLock
from edgellm.engine.graphs import DecodeKey, MixedKey, PrefillKey
from edgellm.kernels import use_reference

from conftest import random_adapters

THREADS, PER_THREAD = 8, 3
PROMPTS = [[1, 17, 33, 8, 61, 40, 9, 22, 5], [1, 50, 6], [1, 90, 14, 27, 3, 88, 44], [1, 17, 33, 8, 61, 12],
           [1, 5, 5, 70]]


def mixed_requests(adapters=("a", "b", "")):
    """THREADS x PER_THREAD requests: batch sizes 1-3, greedy and seeded sampling, rows on LoRA
    adapters or the base model, every third one streamed. [(request, stream?)] per thread."""
    jobs = []
    for t in range(THREADS):
        mine = []
        for r in range(PER_THREAD):
            n = t * PER_THREAD + r
            items = [{"input_ids": PROMPTS[(n + i) % len(PROMPTS)], "lora_weights_name": adapters[(n + i) % len(adapters)]}
                     for i in range(1 + n % 3)]
            sampling = dict(temperature=0) if n % 2 else dict(temperature=0.9, top_k=20, top_p=0.9, seed=n)
            mine.append((LLMGenerationRequest(requests=items, max_generate_length=4 + n % 3, **sampling), n % 3 == 0))
        jobs.append(mine)
    return jobs


def run(runtime, request, stream: bool):
    """(output ids, finish reasons, streamed text per item or None). On the CPU through the torch
    references, which is what CPU users run (the Triton interpreter of the kernel tests would take
    minutes here, and its kernels are checked against those references elsewhere)."""
    pieces = {}
    on_text = (lambda i, delta: pieces.setdefault(i, []).append(delta)) if stream else None
    with use_reference(runtime.device.type == "cpu"):  # per thread: the switch is thread-local
        response = runtime.handle_request(request, on_text=on_text)
    streamed = [''.join(pieces.get(i, [])) for i in range(len(request.requests))] if stream else None
    if stream:
        assert streamed == response.output_texts
    return response.output_ids, response.finish_reasons, streamed


def check_threads_match_one_by_one(runtime, jobs, side_calls=None):
    """Run every job alone, then all of them from THREADS threads at once (plus `side_calls`, run in a
    loop on one more thread until they finish): every answer must be the one it got alone."""
    alone = [[run(runtime, request, stream) for request, stream in mine] for mine in jobs]
    results = [[None] * len(mine) for mine in jobs]
    errors = []
    start = threading.Barrier(len(jobs) + (1 if side_calls else 0))
    done = threading.Event()

    def worker(t):
        try:
            start.wait()
            for r, (request, stream) in enumerate(jobs[t]):
                results[t][r] = run(runtime, request, stream)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def side():
        try:
            start.wait()
            while not done.is_set():
                side_calls()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(jobs))]
    helper = threading.Thread(target=side) if side_calls else None
    for thread in threads + ([helper] if helper else []):
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    if helper:
        helper.join()
    assert not errors, errors
    assert results == alone


def lora_side_calls(runtime, adapter_path):
    """What another thread does meanwhile: load, list, switch and remove an adapter; read stats."""
    def calls():
        runtime.add_lora_weights("c", adapter_path)
        assert "c" in runtime.get_available_lora_weights()
        runtime.switch_lora_weights("c")
        runtime.get_active_lora_weights_name()
        runtime.switch_lora_weights("")
        runtime.remove_lora_weights("c")
        if runtime.kv_store is not None:
            runtime.kv_reuse_stats()
    return calls


@pytest.fixture(scope="module")
def runtime(tiny_models, lora_adapters):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=3,
                               lora_weights={name: path for name, (path, _) in lora_adapters.items()},
                               kv_reuse=KVReuseSettings(gpu_bytes=1 << 20, block_tokens=4))


def test_eight_threads_get_the_answers_of_one_by_one(runtime, lora_adapters):
    check_threads_match_one_by_one(runtime, mixed_requests(), lora_side_calls(runtime, lora_adapters["a"][0]))
    assert runtime.kv_reuse_stats().reused_tokens > 0  # the threaded run reused the prefixes saved alone


def test_a_request_from_a_streaming_callback_joins_the_batch(runtime):
    """The callback runs on the caller's thread, not the engine loop's: a request made from it runs
    beside the one streaming (with KV reuse on here) and gets its answer alone."""
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[1]}], max_generate_length=3, temperature=0)
    with use_reference():
        before = runtime.handle_request(request).output_ids
        seen = []

        def nested(i, delta):
            seen.append((runtime.handle_request(request).output_ids, runtime.get_available_lora_weights()))

        assert runtime.handle_request(request, on_text=nested).output_ids == before
    assert seen and all(ids == before and names == ["a", "b"] for ids, names in seen)


def test_a_nested_request_with_a_draft_model_joins_the_batch(tiny_models):
    """With a draft model's speculation, on the engine loop too: a request made from another's
    streaming callback joins the batch (the draft drafts for both rows, each in its slot) and both get
    the answer they get alone."""
    from edgellm import SpeculativeConfig

    model_dir = tiny_models["llama"][0]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=2, speculative=SpeculativeConfig(
        method="draft", draft_model=model_dir, num_speculative_tokens=2, max_verify_tokens=4))
    outer = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0]}], max_generate_length=8, temperature=0)
    inner = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[1]}], max_generate_length=3, temperature=0)
    nested = []
    with use_reference():
        alone = [runtime.handle_request(r).output_ids for r in (outer, inner)]
        got = runtime.handle_request(outer, on_text=lambda i, d: nested.append(runtime.handle_request(inner)))
    assert got.output_ids == alone[0] and nested and all(r.output_ids == alone[1] for r in nested)
    assert got.speculative.accepted > 0  # the model drafting for itself


@pytest.mark.parametrize("interrupt", [RuntimeError("client went away"), KeyboardInterrupt()])
def test_a_request_interrupted_from_its_callback_leaves_the_runtime_usable(runtime, interrupt):
    check_interrupted_request_leaves_runtime_usable(runtime, interrupt, adapter="a")


def check_interrupted_request_leaves_runtime_usable(runtime, interrupt, adapter):
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0], "lora_weights_name": adapter},
                                             {"input_ids": PROMPTS[2]}], max_generate_length=5, temperature=0)
    calls = []

    def callback(i, delta):
        calls.append(i)
        if len(calls) == 3:  # mid-decode
            raise interrupt

    runtime.eos_token_ids = frozenset()  # no early EOS: the callback sees several tokens
    try:
        with use_reference(runtime.device.type == "cpu"):  # as in run()
            before = runtime.handle_request(request).output_ids
            with pytest.raises(type(interrupt)):
                runtime.handle_request(request, on_text=callback)
            assert len(calls) == 3
            assert runtime.handle_request(request).output_ids == before
    finally:
        runtime.eos_token_ids = runtime._eos_ids()


def test_interrupted_request_releases_its_adapter(tiny_models, lora_adapters):
    rt = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2,
                             lora_weights={"a": lora_adapters["a"][0]})
    rt.eos_token_ids = frozenset()
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[1], "lora_weights_name": "a"}],
                                   max_generate_length=4, temperature=0)

    calls = []

    def stop(i, delta):
        calls.append(delta)
        if len(calls) == 2:  # after the first decode step: the decode batch is running
            raise KeyboardInterrupt

    with use_reference(), pytest.raises(KeyboardInterrupt):
        rt.handle_request(request, on_text=stop)
    assert len(calls) == 2
    rt.remove_lora_weights("a")  # would be refused if the interrupted decode batch still held it
    assert rt.get_available_lora_weights() == []


# ---- the lock itself ----

def _wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_fifo_lock_serves_waiters_in_arrival_order():
    lock, order = FifoLock(), []
    lock.acquire()

    def waiter(n):
        with lock:
            order.append(n)

    threads = []
    for n in range(6):
        threads.append(threading.Thread(target=waiter, args=(n,)))
        threads[-1].start()
        _wait_until(lambda: lock.waiting == n + 1)  # thread n is queued before thread n+1 starts
    lock.release()
    for thread in threads:
        thread.join()
    assert order == list(range(6))


def test_fifo_lock_is_reentrant_and_a_waiter_that_gives_up_leaves_the_queue():
    lock = FifoLock()
    with lock:
        with lock:
            assert lock.owned
        assert lock.owned
        gave_up, got = [], []
        quitter = threading.Thread(target=lambda: gave_up.append(lock.acquire(timeout=0.05)))
        quitter.start()
        quitter.join()
        assert gave_up == [False] and lock.waiting == 0
        late = threading.Thread(target=lambda: (got.append(lock.acquire()), lock.release()))
        late.start()
        _wait_until(lambda: lock.waiting == 1)
    late.join(timeout=10)
    assert got == [True] and not lock.owned
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


def test_exclusive_holds_other_threads_requests_until_it_ends(runtime):
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[2]}], max_generate_length=4, temperature=0)
    alone = run(runtime, request, False)
    got = []

    def wait_and_run():
        with use_reference():
            response = runtime.handle_request(request)
        got.append((response.output_ids, response.timings.queue_ms))

    waiter = threading.Thread(target=wait_and_run)
    with runtime.exclusive() as runner:
        waiter.start()
        _wait_until(lambda: runtime._engine_lock.waiting == 1)
        time.sleep(0.2)
        with use_reference():  # drive the runner by hand meanwhile, and run a request of our own
            runner.prefill_step(runner.embed(torch.tensor([PROMPTS[0]])), [len(PROMPTS[0])])
            assert run(runtime, request, False) == alone
        assert not got
    waiter.join()
    assert got[0][0] == alone[0] and got[0][1] >= 200  # it waited for the whole exclusive block


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_threads_on_gpu_get_the_answers_of_one_by_one(tiny_models, tmp_path):
    """tests/test_threads.py's 8 threads x 3 requests under CUDA graphs, with LoRA adapters loaded and
    removed meanwhile and KV reuse through a device tier and a disk directory (whose writer thread
    runs while graphs are captured)."""
    from edgellm import KVReuseSettings

    model_dir, _ = tiny_models["llama"]
    adapters = random_adapters(model_dir, tmp_path)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=3, lora_weights=adapters,
                                  kv_reuse=KVReuseSettings(gpu_bytes=1 << 16, disk_dir=tmp_path / "kv", block_tokens=4))
    check_threads_match_one_by_one(runtime, mixed_requests(), lora_side_calls(runtime, adapters["a"]))
    assert {type(k) for k in runtime.runner.graphs.graphs} == {DecodeKey, PrefillKey, MixedKey}
    for interrupt in (RuntimeError("client went away"), KeyboardInterrupt()):
        check_interrupted_request_leaves_runtime_usable(runtime, interrupt, adapter="b")
    runtime.close()
