"""Structured output beside the runtime's other features (tiny random byte-level Llama, CPU): per-row LoRA
(a constrained adapter row in a batch gives what it gives alone), KV reuse (a reused prompt gives the same
constrained answer), a reduced vocabulary (the mask read in the reduced id space: only kept tokens, and the
output still validates), and speculation (off for constrained rows: they and the free rows beside them
give the non-speculative runtime's tokens)."""

import json

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime, SpeculativeConfig  # noqa: E402
from edgellm.benchmark import random_lora_dir  # noqa: E402
from edgellm.engine.kv_store import KVReuseSettings  # noqa: E402
from edgellm.engine.vocab_map import save_vocab_map  # noqa: E402

from byte_level_model import byte_level_model  # noqa: E402

pytestmark = pytest.mark.reference_ops

SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["word", "n", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "model"
    byte_level_model(path)
    return path


def _request(items, **settings):
    settings = {"max_generate_length": 60, "temperature": 1.0, "seed": 5, **settings}
    return LLMGenerationRequest(requests=items, **settings)


def _valid(text):
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_constrained_lora_row_in_a_batch_gives_what_it_gives_alone(model_dir, tmp_path):
    """Greedy: sampled rows are not yet batch-invariant on the CPU (the determinism issue), with or without
    a grammar."""
    adapter = random_lora_dir(model_dir, tmp_path / "adapter", rank=4, alpha=16)
    runtime = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=3, lora_weights={"a": adapter})
    row = {"prompt": "JSON:", "response_format": FORMAT, "lora_weights_name": "a"}
    alone = runtime.handle_request(_request([row], temperature=0)).output_ids[0]
    together = runtime.handle_request(_request([{"prompt": "JSON:", "response_format": FORMAT}, row,
                                                {"prompt": "free words"}], temperature=0))
    assert together.output_ids[1] == alone
    assert together.output_ids[0] != alone  # (the adapter acts)
    for text in together.output_texts[:2]:
        _valid(text)


def test_a_reused_prompt_gives_the_same_constrained_answer(model_dir):
    runtime = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=2,
                                  kv_reuse=KVReuseSettings(block_tokens=4, gpu_bytes=1 << 20))
    request = _request([{"prompt": "A long shared prompt that fills whole blocks: JSON:", "response_format": FORMAT}])
    first = runtime.handle_request(request)
    second = runtime.handle_request(request)
    assert second.kv_reuse.reused_tokens > 0
    assert second.output_ids == first.output_ids
    _valid(second.output_texts[0])


def test_a_reduced_vocabulary_reads_the_mask_in_its_own_ids(model_dir, tmp_path):
    full = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=1)
    vocab = full.tokenizer.vocab()
    letters = "bcghijmpqvxyz"  # (the pattern allows them; no key or literal of the schema needs them)
    dropped = {vocab[c] for c in letters}
    kept = [i for i in range(full.config.vocab_size) if i not in dropped]
    save_vocab_map(tmp_path / "map", torch.tensor(kept), {})
    reduced = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=1, reduced_vocab_dir=tmp_path / "map")
    for seed in range(3):
        out = reduced.handle_request(_request([{"prompt": "JSON:", "response_format": FORMAT}], seed=seed))
        assert not dropped & set(out.output_ids[0])
        _valid(out.output_texts[0])
        assert not set(letters) & set(json.loads(out.output_texts[0])["word"])


def test_speculation_leaves_constrained_and_free_rows_as_they_were(model_dir):
    items = [{"prompt": "JSON:", "response_format": FORMAT}, {"prompt": "ab ab ab ab ab ab ab ab"}]
    plain = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=2)
    spec = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=2,
                               speculative=SpeculativeConfig(method="ngram", max_verify_tokens=4, adaptive=False))
    expected = plain.handle_request(_request(items, temperature=0))
    got = spec.handle_request(_request(items, temperature=0))
    assert got.output_ids == expected.output_ids
    _valid(got.output_texts[0])
    alone = spec.handle_request(_request(items[1:], temperature=0))
    assert alone.speculative is not None and alone.output_ids[0] == expected.output_ids[1]
