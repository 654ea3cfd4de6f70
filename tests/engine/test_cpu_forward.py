"""The CPU's numpy forward (engine/cpu_forward.py) against transformers, step by step (a padded two-row
prefill, then decode steps), and against the torch references for what a step can ask: every token's
logits, a chunk that only fills the cache, prefill blocks, sliding windows. Runs without the Triton
interpreter (the numpy path takes the references' place, never the interpreter's)."""

import pytest
import torch

from edgellm.engine import cpu_forward, model
from edgellm.engine.runner import LLMEngineRunner
from edgellm.engine.switches import Switches
from edgellm.kernels.dispatch import use_reference

from conftest import FAMILIES, build_model
from family_models import build_phi3

REFERENCES = Switches(cpu_blas=False)


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _runner(model_dir, capacity=32):
    return LLMEngineRunner(model_dir, device="cpu", dtype="float32", max_batch_size=2, cuda_graphs=False,
                           max_kv_cache_capacity=capacity)


def _forward(runner, ids, starts, lens, slots=(1, 0), **options):
    hidden = runner.weights.embed[ids]
    return model.forward_logits(runner.weights, runner.config, runner.kv_cache, runner.rope, hidden,
                                torch.tensor(slots, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                                torch.tensor(lens, dtype=torch.int32), **options)


@pytest.mark.parametrize("family", [*FAMILIES, "phi3"])
def test_steps_match_transformers(tmp_path, family):
    """Rows of 5 and 3 prompt tokens in one padded chunk, then 6 decode steps of both: each step's logits
    against transformers' at the same position of the row's whole sequence. The families cover GQA,
    llama-3 RoPE scaling, biases, q/k norms with their own head_dim, tied embeddings, (mistral) a
    sliding window shorter than the sequence and (phi3) RoPE over half of each head."""
    if family == "phi3":
        hf = build_phi3(tmp_path)
    else:
        hf = build_model(family, tmp_path, **(dict(sliding_window=4) if family == "mistral" else {}))
    runner = _runner(tmp_path)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, runner.config.vocab_size, (2, 11), generator=generator)
    lengths = [5, 3]
    with torch.no_grad():
        want = [hf(tokens[b:b + 1, :lengths[b] + 6]).logits[0] for b in range(2)]
    hidden = runner.weights.embed[tokens[:, :5]]
    assert cpu_forward.takes(runner.config, runner.rope, hidden, runner.kv_cache, None, None, None)
    got = _forward(runner, tokens[:, :5], [0, 0], lengths)
    for step in range(7):
        for b in range(2):
            expected = want[b][lengths[b] - 1 + step]
            torch.testing.assert_close(got[b], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
        if step == 6:
            break
        ids = torch.stack([tokens[b, lengths[b] + step] for b in range(2)])[:, None]
        got = _forward(runner, ids, [lengths[0] + step, lengths[1] + step], [1, 1])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_what_a_step_asks_matches_the_references(tmp_path, family, monkeypatch):
    """From two caches that start empty, the numpy path and the references through the same chunks:
    a chunk that only fills the cache (logits=False), a chunk with every token's logits, a chunk of
    each row's last token, then decode; prefill attention in blocks of 2 queries and (mistral) a
    window of 3. The logits and every key and value written agree."""
    monkeypatch.setattr(cpu_forward, "QUERY_BLOCK", 2)
    build_model(family, tmp_path, **(dict(sliding_window=3) if family == "mistral" else {}))
    fast, slow = _runner(tmp_path), _runner(tmp_path)
    tokens = torch.randint(3, fast.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    chunks = [(tokens[:, :5], [0, 0], [5, 4], dict(logits=False)),
              (tokens[:, 5:9], [5, 4], [4, 3], dict(every_token=True)),
              (tokens[:, 9:12], [9, 7], [3, 2], {}),
              (tokens[:, 12:13], [12, 9], [1, 1], {}),
              (tokens[:, 13:14], [13, 10], [1, 1], {})]
    for ids, starts, lens, options in chunks:
        got = _forward(fast, ids, starts, lens, **options)
        with use_reference():
            want = _forward(slow, ids, starts, lens, switches=REFERENCES, **options)
        if want is None:
            assert got is None
            continue
        if options.get("every_token"):  # (the padded tokens' logits are the references' business)
            got, want = [torch.cat([x[b, :n] for b, n in enumerate(lens)]) for x in (got, want)]
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    for slot, length in ((1, 14), (0, 11)):
        written = slow.kv_cache.data[:, :, slot, :, :length]
        torch.testing.assert_close(fast.kv_cache.data[:, :, slot, :, :length], written,
                                   atol=1e-5 * written.abs().max().item(), rtol=0)


def test_where_it_does_not_run(tmp_path, monkeypatch):
    """The interpreter, a use_reference block, float16, adapters, trees and explicit positions, the
    switch off, a forward given its own ops: the references (or the kernels)."""
    build_model("llama", tmp_path)
    runner = _runner(tmp_path)
    cfg, rope, cache = runner.config, runner.rope, runner.kv_cache
    hidden = runner.weights.embed[torch.zeros(1, 1, dtype=torch.long)]
    assert cpu_forward.takes(cfg, rope, hidden, cache, None, None, None)
    assert not cpu_forward.takes(cfg, rope, hidden.half(), cache, None, None, None)
    assert not cpu_forward.takes(cfg, rope, hidden, cache, object(), None, None)
    assert not cpu_forward.takes(cfg, rope, hidden, cache, None, object(), None)
    assert not cpu_forward.takes(cfg, rope, hidden, cache, None, None, torch.zeros(1, 1, 3))
    with use_reference():
        assert not cpu_forward.takes(cfg, rope, hidden, cache, None, None, None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not cpu_forward.takes(cfg, rope, hidden, cache, None, None, None)
    assert Switches.from_environment({"EDGELLM_CPU_BLAS": "0"}) == REFERENCES
    assert Switches.from_environment({}).cpu_blas


@pytest.mark.parametrize("family", ["llama_tied", "qwen3"])
def test_the_runtime_on_it_matches_transformers(tiny_models, tmp_path, family):
    """Through the runtime, as a CPU user runs it: a padded batch of three prompts greedy, token for token
    transformers'; then, with KV reuse on disk, a prompt sharing a prefix with an earlier one (its
    blocks copied into the slot, the rest prefilled here) gives the tokens it gives alone."""
    from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime

    from conftest import TINY_PROMPTS, assert_rows_match_transformers

    model_dir, hf_model = tiny_models[family]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", dtype="float32")
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in TINY_PROMPTS], max_generate_length=12,
                                   temperature=0)
    assert_rows_match_transformers(runtime.handle_request(request), hf_model, TINY_PROMPTS, 12)
    settings = KVReuseSettings(gpu_bytes=0, disk_dir=str(tmp_path / "kv"), block_tokens=4)
    reusing = LLMInferenceRuntime(model_dir, device="cpu", dtype="float32", kv_reuse=settings)
    prefix = [1] + list(range(10, 17))

    def greedy(runtime, ids):
        return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": ids}], max_generate_length=8,
                                                           temperature=0))

    greedy(reusing, prefix + list(range(20, 30)))
    hit = greedy(reusing, prefix + list(range(40, 45)))
    assert hit.kv_reuse.reused_tokens == 8
    assert hit.output_ids == greedy(runtime, prefix + list(range(40, 45))).output_ids
