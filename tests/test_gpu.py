"""On a CUDA GPU (bench/gpu_check.sh runs these on the device): end-to-end generation through the
compiled Triton kernels against transformers, and proof that no reference op runs in the hot path.
Skipped where torch sees no GPU (CI); the kernel-level tests in test_kernels_triton.py run there."""

import pytest
import torch

from edgellm import LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from conftest import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 17, 33, 8, 61, 40, 9, 22, 5, 71, 12], [1, 50, 6], [1, 90, 14, 27, 3, 88, 44]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_greedy_token_identical_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    hf_model = hf_model.to("cuda")
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32")
    with forbid_reference_on_cuda():
        response = runtime.handle_request(LLMGenerationRequest(
            requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=24, temperature=0))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=2)
        expected = out[0, len(prompt):].tolist()
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected
    hf_model.to("cpu")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_float16_logits_close_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16")
    ids = torch.tensor([PROMPTS[0][:7], PROMPTS[2]], device="cuda")
    with forbid_reference_on_cuda():
        prefill = runner.prefill_step(runner.embed(ids), [7, 7])
        step = runner.decode_step(runner.embed(torch.tensor([[4], [9]], device="cuda")))
    with torch.no_grad():
        full = hf_model.float()(torch.cat([ids.cpu(), torch.tensor([[4], [9]])], 1)).logits
    torch.testing.assert_close(prefill.cpu(), full[:, 6], rtol=0.02, atol=0.03)
    torch.testing.assert_close(step.cpu(), full[:, 7], rtol=0.02, atol=0.03)


def test_reference_switch_really_forbids(tiny_models):
    from edgellm.kernels.dispatch import ReferenceOnCudaError, KernelOp

    probe = KernelOp("probe", lambda x: x)  # an op with no Triton kernel
    with forbid_reference_on_cuda(), pytest.raises(ReferenceOnCudaError):
        probe(torch.zeros(1, device="cuda"))


def test_sampling_on_gpu_is_seeded_and_runs_without_reference(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cuda")
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0]}, {"input_ids": PROMPTS[1]}],
                                   max_generate_length=16, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    with forbid_reference_on_cuda():
        first = runtime.handle_request(request)
        again = runtime.handle_request(request)
    assert first.output_ids == again.output_ids


# ---- CUDA graphs of the decode step ----

def _decode_runs(model_dir, params, keep=None, **runner_kw):
    from test_decode_path import _fast_path, _padded

    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float32", max_batch_size=4, **runner_kw)
    ids, lengths = _padded(PROMPTS)
    cuda_params = tuple(p.cuda() for p in params)
    with forbid_reference_on_cuda():
        return runner, _fast_path(runner, ids.cuda(), lengths, cuda_params, 12, None if keep is None else 4, keep)


GREEDY = (torch.zeros(3), torch.ones(3, dtype=torch.int32), torch.ones(3), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_graph_replay_gives_the_eager_tokens(tiny_models, sampling):
    from test_decode_path import PARAMS

    model_dir, _ = tiny_models["llama"]
    params = GREEDY if sampling == "greedy" else PARAMS
    graphed, with_graphs = _decode_runs(model_dir, params, keep=[0, 2])
    eager, without = _decode_runs(model_dir, params, keep=[0, 2], cuda_graphs=False)
    assert with_graphs == without
    # 3 rows ran padded to the size-4 graph, then 2 rows on the size-2 graph; the eager runner has none.
    assert sorted(k[0] for k in graphed.graphs.graphs if k[-1] == "decode") == [2, 4]
    assert [k[:2] for k in graphed.graphs.graphs if k[-1] == "prefill"] == [(3, 16)]  # 11 tokens -> bucket 16
    assert not eager.graphs.graphs


def test_prefill_from_ids_graph_matches_eager_and_embeddings(tiny_models):
    """The prefill graphs that start from token ids (the runtime's text path) against the eager runner
    and against prefill_step's graphs from embeddings: buckets 16 and 32, cached prefixes, a second
    replay with other inputs (the graph reads its inputs, nothing of the capture stays)."""
    model_dir, _ = tiny_models["llama"]
    graphed = LLMEngineRunner(model_dir, device="cuda", dtype="float32")
    eager = LLMEngineRunner(model_dir, device="cuda", dtype="float32", cuda_graphs=False)
    longer = [p + p[1:] + [3] * 8 for p in PROMPTS]  # 20-29 tokens: the 32 bucket
    for prompts in (PROMPTS, longer, PROMPTS):
        got, want = graphed.prefill_tokens(prompts), eager.prefill_tokens(prompts)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids = torch.zeros(3, max(map(len, prompts)), dtype=torch.int64, device="cuda")
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        torch.testing.assert_close(graphed.prefill_step(graphed.embed(ids), [len(p) for p in prompts]), want,
                                   rtol=1e-4, atol=1e-4)
        tails = graphed.prefill_tokens(prompts, cached_lengths=[5, 1, 6])
        torch.testing.assert_close(tails, want, rtol=1e-4, atol=1e-4)
    kinds = {k[1:5] for k in graphed.graphs.graphs if k[-1] == "prefill"}
    assert {(16, "", "few keys", "ids"), (32, "", "few keys", "ids"), (16, "", "few keys", "embeds")} <= kinds


def test_rows_leaving_the_batch_do_not_change_the_others(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    _, full = _decode_runs(model_dir, GREEDY)
    _, shrunk = _decode_runs(model_dir, GREEDY, keep=[0, 2])
    assert [step[0] for step in shrunk] == [step[0] for step in full]
    assert [step[-1] for step in shrunk] == [step[2] for step in full]


def test_capture_up_front_and_no_memory_growth_over_200_requests(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=4)
    assert runtime.runner.capture_decode_graphs() == [1, 2, 4]
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=6,
                                   temperature=0.7, seed=1)
    first = runtime.handle_request(request)
    for _ in range(5):
        runtime.handle_request(request)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(200):
        last = runtime.handle_request(request)
    torch.cuda.synchronize()
    assert last.output_ids == first.output_ids
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() == reserved
    assert len(runtime.runner.graphs.graphs) == 3 + 1  # decode sizes 1, 2, 4; one prefill bucket


def test_lora_mixed_batch_on_gpu_matches_the_cpu_reference(tiny_models, tmp_path):
    """Rows with adapter a, adapter b and none in one batch, graphs on and off, float32: the tokens of
    the CPU reference path (which tests/test_lora.py checks against peft's merged models)."""
    from edgellm.benchmark import random_lora_dir

    model_dir, _ = tiny_models["llama"]
    adapters = {"a": random_lora_dir(model_dir, tmp_path / "a", rank=4, alpha=8.0, seed=1),
                "b": random_lora_dir(model_dir, tmp_path / "b", rank=16, alpha=8.0, seed=2, targets=("q", "v", "down"))}
    request = LLMGenerationRequest(requests=[{"input_ids": p, "lora_weights_name": name}
                                             for p, name in zip(PROMPTS, ["a", "b", ""])],
                                   max_generate_length=12, temperature=0)
    base_only = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=12,
                                     temperature=0)
    expected = LLMInferenceRuntime(model_dir, device="cpu", lora_weights=adapters).handle_request(request).output_ids
    base = LLMInferenceRuntime(model_dir, device="cpu").handle_request(base_only).output_ids
    assert expected[:2] != base[:2] and expected[2] == base[2]
    runtimes = {graphs: LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", lora_weights=adapters,
                                            cuda_graphs=graphs) for graphs in (True, False)}
    for runtime in runtimes.values():
        with forbid_reference_on_cuda():
            assert runtime.handle_request(request).output_ids == expected
            runtime.switch_lora_weights("b")  # switching keeps graphs valid: same tokens after a round trip
            runtime.switch_lora_weights("")
            assert runtime.handle_request(request).output_ids == expected
            assert runtime.handle_request(base_only).output_ids == base
    # Batches with adapters and without run on separate graphs (3 rows padded to 4, then fewer as rows end).
    assert {k[1] for k in runtimes[True].runner.graphs.graphs if k[-1] == "decode"} == {"lora", ""}


def test_kv_reuse_through_every_tier_on_gpu(tiny_models, tmp_path):
    """The KV store on CUDA (side-stream host copies, pinned memory, disk): prompts A, B, A, B with a
    device tier of one prompt, a host tier and a disk directory; then a fresh runtime on the same
    directory. Every answer equals the no-reuse run's."""
    from edgellm import KVReuseSettings

    model_dir, _ = tiny_models["llama"]
    a = [1] + [(5 * i) % 80 + 7 for i in range(32)]
    b = [1] + [(3 * i) % 70 + 9 for i in range(32)]
    plain = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32")

    def run(runtime, prompt):
        return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=8,
                                                           temperature=0))

    expected = {tuple(p): run(plain, p).output_ids for p in (a, b)}
    cache = plain.runner.kv_cache.data
    block = cache[:, :, 0, :, :8].numel() * cache.element_size()
    settings = KVReuseSettings(gpu_bytes=4 * block, host_bytes=16 * block, disk_dir=tmp_path, block_tokens=8)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", kv_reuse=settings)
    with forbid_reference_on_cuda():
        responses = [run(runtime, p) for p in (a, b, a, b)]
    runtime.close()
    assert [r.kv_reuse.hits_host for r in responses] == [0, 0, 4, 4]
    assert all(r.output_ids == expected[tuple(p)] for r, p in zip(responses, (a, b, a, b)))
    fresh = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32",
                                kv_reuse=KVReuseSettings(gpu_bytes=4 * block, disk_dir=tmp_path, block_tokens=8))
    again = run(fresh, a)
    assert again.kv_reuse.hits_disk == 4 and again.output_ids == expected[tuple(a)]


@pytest.mark.parametrize("tier", ["gpu", "host"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_memory_tier_hits_copied_inside_the_prefill_graph(tiny_models, chunk, tier):
    """Device-tier (or host-tier) KV hits leave their blocks to the prefill graph
    (runner.attach_block_pools; the host tier's read from pinned memory layer by layer on a side
    stream): a batch of three prompts sharing a 40-token prefix, each row's blocks into its own slot,
    then the same with other tails and rows in another order; chunked (16-token chunks: the table
    rides the first only) or not. Every answer equals the no-reuse run's, under graphs, and the hits
    were hits of that tier."""
    from edgellm import KVReuseSettings

    model_dir, _ = tiny_models["llama"]
    system = [1] + [(7 * i) % 90 + 5 for i in range(39)]
    batches = [[system + [11, 23, 35], system[:24] + [12, 44], system + [12, 44, 56, 3]],
               [system[:33] + [60, 61], system + [9] * 6, system + [11, 23, 35, 36]]]
    plain = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", max_batch_size=3,
                                prefill_chunk_size=chunk)
    settings = KVReuseSettings(gpu_bytes=1 << 20, block_tokens=8) if tier == "gpu" else \
        KVReuseSettings(gpu_bytes=0, host_bytes=1 << 20, block_tokens=8)
    reuse = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", max_batch_size=3, prefill_chunk_size=chunk,
                                kv_reuse=settings)
    assert (reuse.runner.block_pool if tier == "gpu" else reuse.runner.host_block_pool) is not None

    def run(runtime, prompts):
        return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                           max_generate_length=6, temperature=0))

    with forbid_reference_on_cuda():
        run(reuse, [system + [2]])  # saves the prefix's five blocks
        for prompts in batches:
            got = run(reuse, prompts)
            assert got.output_ids == run(plain, prompts).output_ids
            hits = got.kv_reuse.hits_gpu if tier == "gpu" else got.kv_reuse.hits_host
            assert hits == got.kv_reuse.reused_blocks > 0
    sources = {k[4] for k in reuse.runner.graphs.graphs if k[-1] == "prefill"}
    assert sources == ({"ids"} if tier == "gpu" else {"ids", "ids + host blocks"})


# ---- reliability: threads, inference mode, memory limits (issue 12) ----

def _random_adapters(model_dir, root):
    from edgellm.benchmark import random_lora_dir

    return {"a": random_lora_dir(model_dir, root / "a", rank=4, alpha=8.0, seed=1),
            "b": random_lora_dir(model_dir, root / "b", rank=8, alpha=8.0, seed=2, targets=("q", "v", "down"))}


def test_threads_on_gpu_get_the_answers_of_one_by_one(tiny_models, tmp_path):
    """tests/test_threads.py's 8 threads x 3 requests under CUDA graphs, with LoRA adapters loaded and
    removed meanwhile and KV reuse through a device tier and a disk directory (whose writer thread
    runs while graphs are captured)."""
    from edgellm import KVReuseSettings
    from test_threads import check_interrupted_request_leaves_runtime_usable, check_threads_match_one_by_one, \
        lora_side_calls, mixed_requests

    model_dir, _ = tiny_models["llama"]
    adapters = _random_adapters(model_dir, tmp_path)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=3, lora_weights=adapters,
                                  kv_reuse=KVReuseSettings(gpu_bytes=1 << 16, disk_dir=tmp_path / "kv", block_tokens=4))
    check_threads_match_one_by_one(runtime, mixed_requests(), lora_side_calls(runtime, adapters["a"]))
    assert {k[-1] for k in runtime.runner.graphs.graphs} == {"decode", "prefill"}
    for interrupt in (RuntimeError("client went away"), KeyboardInterrupt()):
        check_interrupted_request_leaves_runtime_usable(runtime, interrupt, adapter="b")
    runtime.close()


def test_runner_api_in_and_out_of_inference_mode_on_gpu(tiny_models, tmp_path):
    from test_inference_mode import check_runner_api_in_and_out_of_inference_mode

    model_dir, _ = tiny_models["llama"]
    adapters = _random_adapters(model_dir, tmp_path)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=2, lora_weights={"a": adapters["a"]},
                                  max_lora_rank=8)
    check_runner_api_in_and_out_of_inference_mode(runtime, adapters["b"])
    assert any(k[-1] == "prefill" for k in runtime.runner.graphs.graphs)  # the graph path was the one used


def test_kv_cache_larger_than_the_gpu_fails_up_front(tiny_models):
    from edgellm.errors import ConfigurationError

    model_dir, _ = tiny_models["llama"]
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(ConfigurationError) as caught:
        LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=64, max_kv_cache_capacity=1 << 26)
    message = str(caught.value)
    assert "KV cache (max_batch_size 64 x max_kv_cache_capacity 67108864)" in message
    assert "GiB of memory on cuda" in message and "is free" in message
    needed = float(message.split("need about ")[1].split(" GiB")[0]) * (1 << 30)
    assert needed > total
    assert torch.cuda.memory_allocated() == allocated  # nothing was allocated
    runtime = LLMInferenceRuntime(model_dir, device="cuda")  # right after, in the same process
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0]}],
                                                           max_generate_length=4, temperature=0))
    assert len(response.output_ids[0]) >= 1


def test_memory_plan_bounds_what_the_engine_uses(tmp_path):
    """The SmolLM2-135M shape at max_batch_size 8, prompts up to 1024 tokens: after prefill graphs of
    many shapes and every decode graph, the memory torch reserved for the engine stays within the
    plan the up-front check used (which is printed for bench/RESULTS.md)."""
    from edgellm.benchmark import random_model_dir
    from edgellm.engine.memory import gib

    model_dir = random_model_dir("smollm2-135m", tmp_path)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=8, max_input_length=1024,
                                  max_kv_cache_capacity=2048)
    runtime.runner.capture_decode_graphs()
    generator = torch.Generator().manual_seed(0)
    reserved = []
    for rows, length in ((8, 1024), (1, 100), (3, 700), (8, 300), (5, 1000), (2, 129), (7, 513)):
        prompts = [torch.randint(3, 49000, (length - 7 * i,), generator=generator).tolist() for i in range(rows)]
        runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                    max_generate_length=8, temperature=0))
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    used = torch.cuda.max_memory_reserved() - before
    plan = runtime.runner.memory_plan
    print(f"\nmemory plan {gib(plan.total)} ({plan.describe()}); measured peak reserved {gib(used)}; "
          f"reserved after the first request {gib(reserved[0] - before)}, after all {gib(reserved[-1] - before)}")
    assert used <= plan.total
    # Prefill graphs of new shapes after the largest one cost no more memory (each used to keep a 32 MiB
    # cuBLAS workspace of its own warm-up stream).
    assert reserved[-1] - reserved[0] < 16 << 20


# ---- speculative decoding (issue 13) ----

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_speculative_greedy_on_gpu_is_token_identical(tiny_models, family):
    """fp16, CUDA graphs: n-gram trees and the model as its own draft give exactly the tokens of the
    same runtime with speculation off; the verify graphs are the ones that ran."""
    from edgellm import SpeculativeConfig

    model_dir, _ = tiny_models[family]
    prompts = [[1] + [5, 6, 7, 8, 9] * 4, [1, 50, 6, 7, 50, 6], [1] + list(range(10, 40)) + list(range(10, 20))]
    for config in (SpeculativeConfig(), SpeculativeConfig(method="draft", draft_model=model_dir, draft_top_k=2)):
        runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=3, speculative=config)
        request = dict(requests=[{"input_ids": p} for p in prompts], max_generate_length=32, temperature=0)
        with forbid_reference_on_cuda():
            plain = runtime.handle_request(LLMGenerationRequest(**request, speculative=False))
            spec = runtime.handle_request(LLMGenerationRequest(**request))
            sampled = [runtime.handle_request(LLMGenerationRequest(**{**request, "temperature": 0.8}, seed=3,
                                                                   speculative=s)).output_ids for s in (False, True)]
        assert spec.output_ids == plain.output_ids
        assert spec.speculative.verify_steps > 0 and spec.speculative.accepted > 0
        assert sampled[0] == sampled[1]
        assert any(isinstance(k[-1], tuple) and k[-1][0] == "verify" for k in runtime.runner.graphs.graphs)
