"""The up-front memory check (engine/memory.py): limits that cannot fit fail before anything is
allocated, with a ConfigurationError naming the bytes and the limit to lower; the plan's items are
the bytes the engine really allocates. test_gpu.py checks it against a GPU's free memory and the
allocator's measured peak."""

import pytest
import torch

from edgellm import EngineConfig, KVReuseSettings, LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.memory import check_fits, engine_memory_plan, free_bytes
from edgellm.errors import ConfigurationError


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
