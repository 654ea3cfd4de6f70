"""kernels/sampling.py. The reference (`sample_ref`): distributions against transformers' logits
processors, allowed sets, and seeded runs of the runtime. The Triton kernel: the reference's draws and the
same statistics (tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda, sampling
from edgellm.kernels.sampling import sample_ref, uniform_from_counter

from conftest import TINY_PROMPTS
from kernel_cases import DEVICE, randn

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


@pytest.mark.reference_ops
@pytest.mark.slow
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


# ---- the Triton kernel ----

def _sampling_params(batch, temperature, top_k, top_p):
    return (torch.full((batch,), temperature, device=DEVICE), torch.full((batch,), top_k, dtype=torch.int32, device=DEVICE),
            torch.full((batch,), top_p, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [50, 1000, 4099])
def test_sampling_greedy_and_same_draws_as_reference(dtype, vocab):
    """Greedy rows equal the argmax; sampled rows draw, from the same counter-based numbers, the same
    tokens as the reference except where float summation order moves a cdf boundary (rare)."""
    batch = 16
    logits = (randn(batch, vocab, seed=vocab) * 3).to(dtype)
    temperature = torch.tensor([0.0, 1.0] * (batch // 2), device=DEVICE)
    top_k = torch.tensor([0, 1, 0, 5, 40, 0, 7, 0] * 2, dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 1.0, 0.8, 0.95] * 2, device=DEVICE)
    seeds = torch.arange(batch, device=DEVICE) * 11
    offsets = torch.full((batch,), 3, device=DEVICE)
    out = sampling.sample(logits, temperature, top_k, top_p, seeds, offsets)
    ref = sampling.sample_ref(logits, temperature, top_k, top_p, seeds, offsets)
    greedy = (temperature == 0) | (top_k == 1)
    assert torch.equal(out[greedy], logits.float().argmax(-1)[greedy])
    assert (out == ref).float().mean() >= 0.85


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7)])
def test_sampling_distribution(temperature, top_k, top_p):

    logits = randn(1, 12, seed=3) * 1.5
    expected = hf_distribution(logits.cpu(), temperature, top_k, top_p)[0]
    n = 20000 if DEVICE == "cuda" else 250  # the interpreter runs one row at a time (~0.07 s each)
    rows = logits.expand(n, -1).contiguous()
    tokens = sampling.sample(rows, *_sampling_params(n, temperature, top_k, top_p),
                             torch.full((n,), 99, device=DEVICE), torch.arange(n, device=DEVICE))
    counts = torch.bincount(tokens.cpu(), minlength=12).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0
    wanted = expected[allowed].double() * n
    chi2 = ((counts[allowed] - wanted) ** 2 / wanted).sum().item()
    dof = int(allowed.sum()) - 1
    if dof:
        assert chi2 < CHI2_9999[dof - 1]


def test_sampling_never_leaves_the_allowed_set():
    batch, vocab = 24, 700
    logits = randn(batch, vocab, seed=11) * 4
    g = torch.Generator().manual_seed(2)
    temperature = (torch.rand(batch, generator=g) + 0.3).to(DEVICE)
    top_k = torch.randint(0, 30, (batch,), generator=g, dtype=torch.int32).to(DEVICE)
    top_p = (torch.rand(batch, generator=g) * 0.9 + 0.05).to(DEVICE)
    tokens = sampling.sample(logits, temperature, top_k, top_p, torch.arange(batch, device=DEVICE),
                             torch.zeros(batch, device=DEVICE))
    allowed = sampling.filtered_probs_ref(logits, temperature, top_k, top_p) > 0
    assert allowed[torch.arange(batch, device=DEVICE), tokens].all()


def test_sampling_groups_share_settings_not_offsets():
    """sample(group=G): logits row r uses the settings of row r // G and its own RNG offset, as if
    each settings row were repeated G times."""

    rows, group, vocab = 3, 4, 50
    logits = randn(rows * group, vocab, seed=5) * 2
    temperature = torch.tensor([0.0, 1.0, 0.8], device=DEVICE)
    top_k = torch.tensor([0, 0, 7], dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([1.0, 0.9, 1.0], device=DEVICE)
    seeds = torch.tensor([1, 2, 3], device=DEVICE)
    offsets = torch.arange(rows * group, device=DEVICE) * 5
    got = sampling.sample(logits, temperature, top_k, top_p, seeds, offsets, group=group)
    repeated = [x.repeat_interleave(group) for x in (temperature, top_k, top_p, seeds)]
    assert torch.equal(got, sampling.sample(logits, *repeated, offsets))
    assert torch.equal(sampling.sample_ref(logits, temperature, top_k, top_p, seeds, offsets, group=group),
                       sampling.sample_ref(logits, *repeated, offsets))
    with pytest.raises(ValueError):
        sampling.sample(logits, temperature, top_k, top_p, seeds, offsets[:-1], group=group)


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_sampling_on_gpu_is_seeded_and_runs_without_reference(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cuda")
    request = LLMGenerationRequest(requests=[{"input_ids": TINY_PROMPTS[0]}, {"input_ids": TINY_PROMPTS[1]}],
                                   max_generate_length=16, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    with forbid_reference_on_cuda():
        first = runtime.handle_request(request)
        again = runtime.handle_request(request)
    assert first.output_ids == again.output_ids
