"""Sampling semantics of the reference (`sample_ref`): distributions against transformers' logits
processors, allowed sets, and seeded runs of the runtime. The Triton kernel is held to the same
statistics in test_kernels_triton.py."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels.sampling import sample_ref, uniform_from_counter

# Upper 0.9999 quantiles of the chi-square distribution by degrees of freedom (1..12).
CHI2_9999 = [15.14, 18.42, 21.11, 23.51, 25.74, 27.86, 29.88, 31.83, 33.72, 35.56, 37.37, 39.13]


def hf_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = logits.clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def draw(logits_row, temperature, top_k, top_p, n, seed=1234):
    rows = logits_row.expand(n, -1).contiguous()
    return sample_ref(rows, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int32),
                          torch.full((n,), top_p), torch.full((n,), seed), torch.arange(n))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                      (0.9, 6, 0.7)])
def test_frequencies_match_renormalised_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 10) * 1.5
    expected = hf_distribution(logits, temperature, top_k, top_p)[0]
    n = 40000
    counts = torch.bincount(draw(logits, temperature, top_k, top_p, n), minlength=10).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, "sampled a token outside the top-k/top-p set"
    observed, wanted = counts[allowed], expected[allowed].double() * n
    chi2 = ((observed - wanted) ** 2 / wanted).sum().item()
    dof = int(allowed.sum()) - 1
    if dof > 0:
        assert chi2 < CHI2_9999[dof - 1], f"chi2 {chi2:.1f} with {dof} dof"


def test_never_outside_allowed_set_on_many_random_rows():
    torch.manual_seed(1)
    batch, vocab = 256, 500
    logits = torch.randn(batch, vocab) * 3
    temperature = torch.rand(batch) + 0.3
    top_k = torch.randint(0, 40, (batch,), dtype=torch.int32)
    top_p = torch.rand(batch) * 0.9 + 0.05
    tokens = sample_ref(logits, temperature, top_k, top_p, torch.arange(batch) * 7, torch.zeros(batch))
    for b in range(batch):
        allowed = hf_distribution(logits[b:b + 1], temperature[b].item(), int(top_k[b]), top_p[b].item())[0] > 0
        assert allowed[tokens[b]], f"row {b} sampled a token outside its allowed set"


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 300)
    tokens = sample_ref(logits, torch.tensor([0.0, 1.0, 1.0, 0.5]), torch.tensor([0, 1, 0, 0]),
                            torch.tensor([1.0, 1.0, 0.5, 1.0]), torch.arange(4), torch.zeros(4))
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()


def test_counter_uniforms_are_uniform_and_deterministic():
    u = uniform_from_counter(torch.full((50000,), 99), torch.arange(50000))
    assert 0 <= u.min() and u.max() < 1
    assert torch.equal(u, uniform_from_counter(torch.full((50000,), 99), torch.arange(50000)))
    counts = torch.histc(u, bins=10, min=0, max=1).double()
    chi2 = ((counts - 5000) ** 2 / 5000).sum().item()
    assert chi2 < CHI2_9999[8]


def test_seeded_generation_repeats_and_seeds_differ(llama_dir):
    runtime = LLMInferenceRuntime(llama_dir, device="cpu")

    def run(seed):
        return runtime.handle_request(LLMGenerationRequest(
            requests=[{"input_ids": [1, 5, 9]}, {"input_ids": [1, 5, 9]}], max_generate_length=20,
            temperature=1.5, top_k=0, seed=seed)).output_ids

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first[0] != first[1], "two items of one request should draw different numbers"
