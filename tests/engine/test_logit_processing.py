"""Logit processing in generation (engine/logit_processing.py through the runtime): greedy and seeded
outputs with presence / frequency / repetition penalties, logit_bias and min_p equal a step-by-step torch
reference (transformers' logits, kernels/logit_processing.py's reference, kernels/sampling.py's reference
draw with the runtime's seeds and RNG offsets); processed and plain rows in one running batch (a prompt
prefilled beside a decoding row) each as alone; bad values refused before any model work."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import InvalidRequestError
from edgellm.kernels.logit_processing import process_logits_ref
from edgellm.kernels.sampling import sample_ref
from edgellm.requests import SamplingSettings, item_seeds

pytestmark = pytest.mark.reference_ops

PROMPT = [1, 17, 33, 8, 61, 40, 9, 22, 5, 71, 12, 17, 33]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=3, prefill_budget=4,
                               prefill_chunk_size=8)


def reference(model, prompt, new, *, presence=0.0, frequency=0.0, repetition=1.0, min_p=0.0, bias=None,
              temperature=0.0, top_k=0, top_p=1.0, seed=None):
    """Tokens of a step-by-step generation: transformers' logits, then the processing reference, then
    the sampling reference (greedy: argmax) with the seed and the RNG offset of each token."""
    vocab = model.config.vocab_size
    counts = torch.zeros(2, vocab, dtype=torch.int32)
    seen = torch.zeros(2, vocab, dtype=torch.uint8)
    seen[0, prompt] = 1
    bias_row = torch.zeros(2, vocab)
    for token, value in (bias or {}).items():
        bias_row[0, token] = value
    one = lambda v: torch.tensor([float(v), 0.0])  # noqa: E731
    ids, out = list(prompt), []
    seed_value = item_seeds(SamplingSettings(temperature, top_k, top_p, seed), 1)[0]
    for offset in range(new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1].float()
        logits = process_logits_ref(logits, torch.tensor([0], dtype=torch.int32), torch.tensor([1, 0]), counts, seen,
                                    bias_row, one(presence), one(frequency), one(repetition), one(min_p),
                                    one(temperature), torch.zeros(2, dtype=torch.int32),
                                    torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32))
        if temperature == 0:
            token = int(logits.argmax(-1))
        else:
            token = int(sample_ref(logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]),
                                   torch.tensor([seed_value]), torch.tensor([offset]))[0])
        out.append(token)
        ids.append(token)
        counts[0, token] += 1
    return out


def _generate(runtime, new, **settings):
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=new, ignore_eos=True,
                                   **settings)
    return runtime.handle_request(request).output_ids[0]


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.8),
    dict(presence_penalty=1.5, frequency_penalty=0.8),
    dict(logit_bias={40: 3.0, 9: -100.0, 22: 1.5}),
    dict(repetition_penalty=0.7, presence_penalty=-0.5, logit_bias={12: 2.0}),
])
def test_greedy_generation_equals_the_reference(runtime, tiny_models, settings):
    model = tiny_models["llama"][1]
    expected = reference(model, PROMPT, 14, presence=settings.get("presence_penalty", 0.0),
                         frequency=settings.get("frequency_penalty", 0.0),
                         repetition=settings.get("repetition_penalty", 1.0), bias=settings.get("logit_bias"))
    got = _generate(runtime, 14, temperature=0, **settings)
    assert got == expected
    assert got != _generate(runtime, 14, temperature=0)  # (the settings change this output)


def test_seeded_sampling_with_min_p_and_penalties_equals_the_reference(runtime, tiny_models):
    model = tiny_models["llama"][1]
    for seed in (3, 11):
        settings = dict(temperature=1.3, top_k=0, top_p=1.0, seed=seed)
        expected = reference(model, PROMPT, 12, min_p=0.3, frequency=0.5, **settings)
        assert _generate(runtime, 12, min_p=0.3, frequency_penalty=0.5, **settings) == expected


def test_processed_and_plain_rows_share_the_batch(runtime):
    processed = dict(temperature=0, repetition_penalty=1.6, logit_bias={33: 2.5})
    alone = [_generate(runtime, 40, temperature=0), _generate(runtime, 10, **processed),
             _generate(runtime, 10, temperature=0.9, top_k=0, seed=5, presence_penalty=1.0)]
    settings = [dict(temperature=0), processed, dict(temperature=0.9, top_k=0, seed=5, presence_penalty=1.0)]
    steps = dict(runtime.serving_stats()["steps"])
    handles = [runtime.submit(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], ignore_eos=True,
                                                   max_generate_length=40 if i == 0 else 10, **s))
               for i, s in enumerate(settings)]
    got = [handle.result(60).output_ids[0] for handle in handles]
    assert got == alone
    mixed = runtime.serving_stats()["steps"].get("mixed", 0) - steps.get("mixed", 0)
    assert mixed > 0  # (the later prompts were prefilled beside the first row's decode steps)


def test_bad_processing_values_are_refused(runtime):
    for settings, words in ((dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                            (dict(logit_bias={10_000: 1.0}), "outside the vocabulary"),
                            (dict(logit_bias={3: float("nan")}), "bias of token 3"),
                            (dict(presence_penalty="high"), "presence_penalty")):
        with pytest.raises(InvalidRequestError, match=words):
            runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], **settings))
    assert len(_generate(runtime, 3, temperature=0)) == 3


def test_logprobs_are_the_raw_logits_log_softmax(runtime, tiny_models):
    """Each token's logprob and its top alternatives: transformers' log-softmax at that step (the raw
    logits: penalties and temperature change the draw, not the reported logprobs), first token included."""
    model = tiny_models["llama"][1]
    for settings in (dict(temperature=0), dict(temperature=0, repetition_penalty=1.7, logit_bias={40: 2.0}),
                     dict(temperature=1.1, top_k=0, seed=2)):
        response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=8,
                                                               ignore_eos=True, logprobs=4, **settings))
        ids, logprobs = response.output_ids[0], response.logprobs[0]
        assert [t.token for t in logprobs] == ids and all(len(t.top) == 4 for t in logprobs)
        for n, entry in enumerate(logprobs):
            with torch.no_grad():
                expected = torch.log_softmax(model(torch.tensor([PROMPT + ids[:n]])).logits[0, -1].float(), -1)
            assert entry.logprob == pytest.approx(float(expected[entry.token]), abs=1e-4)
            top = expected.topk(4)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_stream_with_their_tokens_beside_plain_rows(runtime):
    alone = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=9,
                                                        ignore_eos=True, temperature=0, logprobs=2))
    plain = runtime.submit(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=30,
                                                ignore_eos=True, temperature=0))
    handle = runtime.submit(LLMGenerationRequest(requests=[{"input_ids": PROMPT[:9]}, {"input_ids": PROMPT}],
                                                 max_generate_length=9, ignore_eos=True, temperature=0, logprobs=2))
    streamed = [[], []]
    for delta in handle.deltas():
        streamed[delta.item].extend(delta.logprobs)
    response = handle.result()
    assert plain.result(60).logprobs is None
    assert streamed == response.logprobs and len(streamed[1]) == 9
    assert [t.token for t in response.logprobs[1]] == [t.token for t in alone.logprobs[0]]
    assert [t.logprob for t in response.logprobs[1]] == pytest.approx([t.logprob for t in alone.logprobs[0]], abs=1e-5)
