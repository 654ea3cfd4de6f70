"""Mixed steps (engine/mixed_steps.py): a decode step of the running rows and a prompt chunk in one
forward give what the decode step and a separate prefill of the chunk give: the decode rows' tokens and
logits, the chunk's cache and its rows' first tokens (drawn with their own settings at RNG offset 0),
the cache lengths, and the steps after. CPU here (the forward's ops; the separate steps take the numpy
path); on CUDA under graphs, captured while live rows decode (set aside and put back)."""

import pytest
import torch

from edgellm import LLMEngineRunner
from edgellm.errors import InvalidRequestError

from conftest import DEVICES, TINY_PROMPTS

CHUNKED = [1, 90, 14, 27, 3, 88, 44, 61, 5]  # the chunk row's prompt, in chunks of 4 and 5 tokens
SLOT = 3


def _runner(model_dir, device, adapters=None):
    lora = {name: path for name, (path, _) in adapters.items()} if adapters else None
    return LLMEngineRunner(model_dir, device=device, dtype="float32", max_batch_size=4, lora_weights=lora)


def _start(runner, lora):
    """Two rows decoding (slots 0 and 1): one greedy, one sampled."""
    logits = runner.prefill_tokens(TINY_PROMPTS[:2], slots=[0, 1], lora=lora)
    runner.start_decode(logits.argmax(-1), [0, 1], [0.0, 0.8], [1, 5], [1.0, 0.9], [0, 7], [0, 0], lora=lora)


def _chunk_sampling(device):
    return [0.9], [0], [1.0], [11]


def _separate(runner, lora, chunk_lora):
    """The chunk prefilled apart, each piece before a decode step; then two more decode steps."""
    steps = []
    for cached, end in ((0, 4), (4, len(CHUNKED))):
        logits = runner.prefill_tokens([CHUNKED[:end]], slots=[SLOT], cached_lengths=[cached], lora=chunk_lora)
        steps.append((runner.decode_sample_step().tolist(), runner.decode_logits().clone()))
    temperature, top_k, top_p, seeds = (torch.tensor(v).to(runner.device) for v in _chunk_sampling(runner.device))
    first = runner.sample(logits, temperature.float(), top_k.int(), top_p.float(), seeds,
                          torch.zeros(1, dtype=torch.int64, device=runner.device)).tolist()
    after = [runner.decode_sample_step().tolist() for _ in range(2)]
    return steps, first, after


def _mixed(runner, lora, chunk_lora):
    steps = []
    for cached, end in ((0, 4), (4, len(CHUNKED))):
        tokens = runner.mixed_launch([CHUNKED[:end]], [SLOT], [cached], chunk_lora, *_chunk_sampling(runner.device)).wait()
        first = tokens[:1]
        steps.append((tokens[1:], runner.decode_logits().clone()))
    after = [runner.decode_sample_step().tolist() for _ in range(2)]
    return steps, first, after


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_a_mixed_step_gives_the_decode_step_and_the_separate_prefill(tiny_models, device, family):
    model_dir, _ = tiny_models[family]
    results, caches = [], []
    for run in (_separate, _mixed):
        runner = _runner(model_dir, device)
        _start(runner, None)
        results.append(run(runner, None, None))
        caches.append((runner.kv_cache.data[:, :, SLOT, :, :len(CHUNKED)].clone(),
                       runner.kv_cache.lengths[[0, 1, SLOT]].tolist()))
    (steps_a, first_a, after_a), (steps_b, first_b, after_b) = results
    assert [tokens for tokens, _ in steps_b] == [tokens for tokens, _ in steps_a]
    for (_, logits_a), (_, logits_b) in zip(steps_a, steps_b):
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)
    assert first_b == first_a and after_b == after_a
    torch.testing.assert_close(caches[1][0], caches[0][0], rtol=1e-4, atol=1e-4)
    assert caches[1][1] == caches[0][1] == [len(TINY_PROMPTS[0]) + 4, len(TINY_PROMPTS[1]) + 4, len(CHUNKED)]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_steps_with_adapters_per_row(tiny_models, lora_adapters, device):
    """Decode rows on adapter a and the base model, the chunk row on b: each token's adapter applies."""
    model_dir, _ = tiny_models["llama"]
    results = []
    for run in (_separate, _mixed):
        runner = _runner(model_dir, device, lora_adapters)
        _start(runner, ["a", ""])
        results.append(run(runner, ["a", ""], ["b"]))
    (steps_a, first_a, after_a), (steps_b, first_b, after_b) = results
    assert [tokens for tokens, _ in steps_b] == [tokens for tokens, _ in steps_a]
    for (_, logits_a), (_, logits_b) in zip(steps_a, steps_b):
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)
    assert first_b == first_a and after_b == after_a


def test_mixed_launch_refuses_bad_chunks_before_any_work(tiny_models):
    runner = _runner(tiny_models["llama"][0], "cpu")
    sampling = _chunk_sampling("cpu")
    with pytest.raises(RuntimeError, match="before start_decode"):
        runner.mixed_launch([CHUNKED], [SLOT], [0], None, *sampling)
    _start(runner, None)
    lengths = runner.kv_cache.lengths.clone()
    for prompts, slots, cached, match in (([CHUNKED], [1], [0], "running decode row"),
                                          ([CHUNKED], [9], [0], "distinct slots"),
                                          ([CHUNKED], [SLOT], [len(CHUNKED)], "cached lengths"),
                                          ([[1, 10 ** 6]], [SLOT], [0], "token ids")):
        with pytest.raises(InvalidRequestError, match=match):
            runner.mixed_launch(prompts, slots, cached, None, *sampling)
    with pytest.raises(InvalidRequestError, match="one sampling setting"):
        runner.mixed_launch([CHUNKED], [SLOT], [0], None, [0.5, 0.5], [0], [1.0], [1])
    small = LLMEngineRunner(tiny_models["llama"][0], device="cpu", dtype="float32", max_batch_size=4,
                            prefill_chunk_size=4)
    _start(small, None)
    with pytest.raises(InvalidRequestError, match="at most 4 new tokens"):
        small.mixed_launch([CHUNKED], [SLOT], [0], None, *sampling)
    assert torch.equal(runner.kv_cache.lengths, lengths)
    assert runner.mixed_launch([CHUNKED], [SLOT], [0], None, *sampling).wait()  # still usable
