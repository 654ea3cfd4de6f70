"""kernels/logit_processing.py: the Triton kernels against their torch references (the interpreter on the
CPU, compiled kernels on a GPU), and the references against transformers' and OpenAI's definitions: the
repetition penalty as transformers' RepetitionPenaltyLogitsProcessor, presence/frequency as OpenAI
documents them, min_p as transformers' MinPLogitsWarper (a ruled-out token's probability is 0)."""

import pytest
import torch

from edgellm.kernels import logit_processing as lp

from kernel_cases import DEVICE, randn

VOCAB, SLOTS = 300, 5  # (slot 4: the scratch slot, never enabled)


def _state(seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3, (SLOTS, vocab), generator=g, dtype=torch.int32)
    counts[4] = 0
    seen = (torch.rand(SLOTS, vocab, generator=g) < 0.1).to(torch.uint8)
    bias = torch.where(torch.rand(SLOTS, vocab, generator=g) < 0.05, torch.randn(SLOTS, vocab, generator=g) * 5, 0.0)
    scalars = dict(presence=torch.tensor([0.5, 0.0, -1.0, 1.5, 0.0]), frequency=torch.tensor([0.3, 0.0, 0.7, -0.4, 0.0]),
                   repetition=torch.tensor([1.3, 1.0, 0.8, 2.0, 1.0]), min_p=torch.tensor([0.0, 0.2, 0.05, 0.0, 0.0]),
                   temperature=torch.tensor([1.0, 0.7, 1.3, 0.0, 1.0]))
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (SLOTS, words), generator=g, dtype=torch.int32)
    state = dict(enabled=torch.tensor([1, 1, 0, 1, 0], dtype=torch.int32), counts=counts, seen=seen,
                 bias=bias.float(), **scalars, masked=torch.tensor([0, 1, 1, 1, 0], dtype=torch.int32), mask=mask)
    return {k: v.to(DEVICE) for k, v in state.items()}


@pytest.mark.parametrize("vocab", [VOCAB, 2500])  # (2500: several blocks of the GPU's block size too)
def test_process_logits_kernel_matches_its_reference(vocab):
    state = _state(vocab=vocab)
    logits = randn(6, vocab, seed=1) * 4
    row_slots = torch.tensor([3, 0, 2, 1, 4, 4], dtype=torch.int32, device=DEVICE)
    got = lp.process_logits(logits.clone(), row_slots, **state)
    expected = lp.process_logits_ref(logits.clone(), row_slots, **state)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(got[[2, 4, 5]], logits[[2, 4, 5]])  # slot 2 off, padding rows on the scratch slot


def _allowed(mask_row, ids):
    return ((mask_row[ids // 32] >> (ids % 32)) & 1).bool()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_token_mask_leaves_only_allowed_tokens_drawable(temperature):
    """A masked slot's disallowed tokens sit 200 temperatures (greedy: 200) under its best allowed one,
    finite; allowed ones keep their processed values; with a reduced vocabulary the bits are read by
    full id (full_ids)."""
    state = _state(5, vocab=2500)
    state["temperature"][:] = temperature
    logits = randn(2, 2500, seed=2) * 4
    row_slots = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    got = lp.process_logits(logits.clone(), row_slots, **state)
    torch.testing.assert_close(got, lp.process_logits_ref(logits.clone(), row_slots, **state), rtol=1e-6, atol=1e-5)
    allowed = _allowed(state["mask"][1], torch.arange(2500, device=DEVICE))
    best = got[0][allowed].max()
    spread = 200.0 * (temperature or 1.0)
    assert torch.isfinite(got).all() and torch.allclose(got[0][~allowed], best - spread)
    assert int(got[0].argmax()) in torch.nonzero(allowed).flatten().tolist()
    plain = dict(state, masked=torch.zeros_like(state["masked"]))
    expected = lp.process_logits_ref(logits.clone(), row_slots, **plain)
    assert torch.equal(got[1], expected[1])  # slot 0 is not masked
    full_ids = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:2500].to(torch.int32).to(DEVICE)
    wide = dict(state, mask=torch.randint(-2**31, 2**31 - 1, (SLOTS, 125), dtype=torch.int32).to(DEVICE))
    got = lp.process_logits(logits.clone(), row_slots, **wide, full_ids=full_ids)
    torch.testing.assert_close(got, lp.process_logits_ref(logits.clone(), row_slots, **wide, full_ids=full_ids),
                               rtol=1e-6, atol=1e-5)
    allowed = _allowed(wide["mask"][1], full_ids.long())
    assert torch.allclose(got[0][~allowed], got[0][allowed].max() - spread)


def test_count_tokens_kernel_matches_its_reference():
    state = _state(3)
    tokens = torch.tensor([7, 7, 299, 0, 5], dtype=torch.int64, device=DEVICE)
    row_slots = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    got, expected = state["counts"].clone(), state["counts"].clone()
    lp.count_tokens(tokens, row_slots, state["enabled"], got)
    lp.count_tokens_ref(tokens, row_slots, state["enabled"], expected)
    assert torch.equal(got, expected)
    assert got[0, 7] == state["counts"][0, 7] + 1 and torch.equal(got[2], state["counts"][2])


def test_reference_follows_the_published_definitions():
    from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 3
    prompt = torch.tensor([[3, 9, 27, 81]])
    output = [5, 5, 9, 100]
    history = torch.cat([prompt, torch.tensor([output])], 1)
    counts = torch.zeros(2, VOCAB, dtype=torch.int32)
    for t in output:
        counts[0, t] += 1
    seen = torch.zeros(2, VOCAB, dtype=torch.uint8)
    seen[0, prompt[0]] = 1
    bias = torch.zeros(2, VOCAB)
    bias[0, [1, 2]] = torch.tensor([4.0, -100.0])
    one = lambda v: torch.tensor([v, 0.0])  # noqa: E731
    slots = torch.tensor([0], dtype=torch.int32)
    enabled = torch.tensor([1, 0], dtype=torch.int32)

    off = dict(masked=torch.zeros(2, dtype=torch.int32), mask=torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32))
    got = lp.process_logits_ref(logits.clone(), slots, enabled, counts, seen, bias, one(0.0), one(0.0), one(1.5),
                                one(0.0), one(1.0), **off)
    biased = logits.clone()
    biased[0, [1, 2]] += torch.tensor([4.0, -100.0])
    torch.testing.assert_close(got, RepetitionPenaltyLogitsProcessor(1.5)(history, biased))

    got = lp.process_logits_ref(logits.clone(), slots, enabled, counts, seen, torch.zeros(2, VOCAB), one(0.6),
                                one(0.25), one(1.0), one(0.0), one(1.0), **off)
    expected = logits.clone()
    for t in set(output):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        expected[0, t] -= output.count(t) * 0.25 + 0.6
    torch.testing.assert_close(got, expected)

    for temperature in (1.0, 0.5):
        got = lp.process_logits_ref(logits.clone(), slots, enabled, torch.zeros_like(counts), torch.zeros_like(seen),
                                    torch.zeros(2, VOCAB), one(0.0), one(0.0), one(1.0), one(0.1), one(temperature),
                                    **off)
        hf = MinPLogitsWarper(0.1)(None, logits / temperature).softmax(-1)
        torch.testing.assert_close((got / temperature).softmax(-1), hf, rtol=0, atol=1e-7)
