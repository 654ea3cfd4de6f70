"""The up-front memory check (engine/memory.py): limits that cannot fit fail before anything is
allocated, with a ConfigurationError naming the bytes and the limit to lower; the plan's items are
the bytes the engine really allocates. its gpu-marked tests check it against a GPU's free memory and the
allocator's measured peak."""

import pytest
import torch

from edgellm import EngineConfig, KVReuseSettings, LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.memory import check_fits, engine_memory_plan, free_bytes
from edgellm.errors import ConfigurationError

from conftest import TINY_PROMPTS


def _item(plan, prefix):
    return next(i for i in plan.items if i.what.startswith(prefix))


def test_plan_counts_what_the_engine_allocates(tiny_models, lora_adapters):
    runner = LLMEngineRunner(tiny_models["llama"][0], device="cpu", max_batch_size=3, max_kv_cache_capacity=40,
                             lora_weights={"a": lora_adapters["a"][0]}, max_loras=2)
    plan = runner.memory_plan
    weights = runner.weights
    tensors = [weights.embed, weights.final_norm] + ([] if weights.lm_head is weights.embed else [weights.lm_head])
    for layer in weights.layers:
        tensors += [t for t in vars(layer).values() if t is not None]
    assert _item(plan, "weights").nbytes == sum(t.nbytes for t in tensors)
    rope = sum(t.nbytes for t in runner.rope_cos_sin)
    assert _item(plan, "KV cache").nbytes == runner.kv_cache.nbytes + rope
    stacks = [t for layer in runner.lora.layers for pair in layer.values() for t in pair]
    assert _item(plan, "LoRA stacks").nbytes == sum(t.nbytes for t in stacks)
    assert plan.total > sum(i.nbytes for i in plan.items)  # plus a margin


def test_a_kv_cache_larger_than_memory_fails_before_loading_and_names_the_limit(tiny_models):
    model_dir = tiny_models["llama"][0]
    free = free_bytes(torch.device("cpu"))
    if free is None:
        pytest.skip("this system does not report its available memory")
    with pytest.raises(ConfigurationError) as caught:
        LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=64, max_kv_cache_capacity=1 << 40)
    message = str(caught.value)
    assert "KV cache (max_batch_size 64 x max_kv_cache_capacity 1099511627776)" in message
    assert "free" in message and "GiB" in message
    assert "lower max_kv_cache_capacity or max_batch_size" in message.lower()
    # A runtime built right after, with limits that fit, works.
    response = LLMInferenceRuntime(model_dir, device="cpu").handle_request(
        LLMGenerationRequest(requests=[{"input_ids": [1, 5, 7]}], max_generate_length=2, temperature=0))
    assert len(response.output_ids[0]) >= 1


def test_the_kv_reuse_device_tier_counts(tiny_models):
    if free_bytes(torch.device("cpu")) is None:
        pytest.skip("this system does not report its available memory")
    with pytest.raises(ConfigurationError, match="KV reuse device tier"):
        LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", kv_reuse=KVReuseSettings(gpu_bytes=1 << 60))


def test_check_fits_names_bytes_and_what_fits(tiny_models):
    cfg = EngineConfig.from_model_dir(tiny_models["llama"][0], max_kv_cache_capacity=1 << 18)
    plan = engine_memory_plan(cfg, torch.float16, prefill_chunk=2048, graphs=True)
    check_fits(plan, torch.device("cuda"), plan.total)  # exactly enough: fine
    check_fits(plan, torch.device("cuda"), None)  # unknown: no check
    kv = _item(plan, "KV cache").nbytes
    free = plan.total - kv // 2  # room for about half the KV cache
    with pytest.raises(ConfigurationError) as caught:
        check_fits(plan, torch.device("cuda"), free)
    message = str(caught.value)
    fits = int(message.split("max_kv_cache_capacity up to about ")[1].split()[0])
    assert 0 < fits < cfg.max_kv_cache_capacity
    assert "of memory on cuda, but only" in message and "KV cache" in message
    with pytest.raises(ConfigurationError, match="weights alone do not fit"):
        check_fits(plan, torch.device("cuda"), _item(plan, "weights").nbytes)


# ---- on a CUDA GPU ----

@pytest.mark.gpu
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
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": TINY_PROMPTS[0]}],
                                                           max_generate_length=4, temperature=0))
    assert len(response.output_ids[0]) >= 1


@pytest.mark.gpu
def test_memory_plan_bounds_what_the_engine_uses(tmp_path):
    """The SmolLM2-135M shape at max_batch_size 8, prompts up to 1024 tokens: after prefill graphs of
    many shapes and every decode and mixed-step graph, the memory torch reserved for the engine stays within the
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
    runtime.capture_graphs()  # every decode graph and the engine loop's mixed steps (prompts chunked beside rows)
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
