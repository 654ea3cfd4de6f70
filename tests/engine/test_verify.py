"""The runner's speculative verify steps (engine/verify.py) against plain decoding: a token tree's
logits equal those of decoding each branch on its own; a kept path leaves the cache as if it had
been decoded; the fast step emits exactly the tokens plain decoding emits (greedy, and sampled with
the same seed), whatever the drafts."""

import pytest
import torch

from edgellm import LLMEngineRunner
from edgellm.kernels import ops, use_reference

PROMPTS = [[1, 17, 33, 8, 61, 40, 9], [1, 50, 6]]


def _runner(model_dir, **kw):
    return LLMEngineRunner(model_dir, device="cpu", dtype="float32", max_batch_size=2, **kw)


def _prefill(runner, prompts):
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    return runner.prefill_step(runner.embed(ids), [len(p) for p in prompts])


def _decoded_logits(model_dir, prompt, tokens):
    """Logits after each of `tokens`, decoded one by one after `prompt` (row 0)."""
    runner = _runner(model_dir)
    _prefill(runner, [prompt])
    return [runner.decode_step(runner.embed(torch.tensor([[t]]))) for t in tokens]


def test_tree_logits_equal_each_branch_decoded_alone(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    runner = _runner(model_dir)
    _prefill(runner, PROMPTS)
    # Row 0: root 70 -> (a 11 -> c 13), (b 12). Row 1: a chain 80 -> 21 -> 22 -> 23.
    tokens = torch.tensor([[70, 11, 12, 13], [80, 21, 22, 23]])
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    for i, ancestors in enumerate([[0], [0, 1], [0, 2], [0, 1, 3]]):
        mask[0, i, ancestors] = True
    mask[1] = torch.ones(4, 4, dtype=torch.bool).tril()
    logits = runner.tree_decode_step(runner.embed(tokens), mask)
    assert runner.kv_cache.lengths[:2].tolist() == [7, 3]  # not advanced
    branches = {0: [70], 1: [70, 11], 2: [70, 12], 3: [70, 11, 13]}
    for node, path in branches.items():
        expected = _decoded_logits(model_dir, PROMPTS[0], path)[-1][0]
        torch.testing.assert_close(logits[0, node], expected, rtol=1e-4, atol=1e-4)
    chain = _decoded_logits(model_dir, PROMPTS[1], [80, 21, 22, 23])
    for node in range(4):
        torch.testing.assert_close(logits[1, node], chain[node][0], rtol=1e-4, atol=1e-4)
    # Keep root -> b in row 0 and the whole chain in row 1, then decode one more token each.
    runner.commit_tree_path(torch.tensor([[0, 2, 0, 0], [0, 1, 2, 3]]), torch.tensor([1, 3]))
    assert runner.kv_cache.lengths[:2].tolist() == [9, 7]
    after = runner.decode_step(runner.embed(torch.tensor([[5], [6]])))
    torch.testing.assert_close(after[0], _decoded_logits(model_dir, PROMPTS[0], [70, 12, 5])[-1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[1], _decoded_logits(model_dir, PROMPTS[1], [80, 21, 22, 23, 6])[-1][0],
                               rtol=1e-4, atol=1e-4)


def _plain_tokens(model_dir, params, steps):
    """Tokens plain decoding emits per row (the first from the prefill logits), fast path."""
    runner = _runner(model_dir)
    logits = _prefill(runner, PROMPTS)
    temperature, top_k, top_p, seeds = params
    offsets = torch.zeros(2, dtype=torch.int64)
    first = ops.sample(logits, temperature, top_k, top_p, seeds, offsets)
    runner.start_decode(first, [0, 1], temperature, top_k, top_p, seeds, offsets)
    out = [first.tolist()]
    for _ in range(steps):
        out.append(runner.decode_sample_step().tolist())
    return [[step[row] for step in out] for row in range(2)]


GREEDY = (torch.zeros(2), torch.ones(2, dtype=torch.int32), torch.ones(2), torch.zeros(2, dtype=torch.int64))
SAMPLED = (torch.full((2,), 0.9), torch.full((2,), 20, dtype=torch.int32), torch.full((2,), 0.95),
           torch.tensor([11, 12], dtype=torch.int64))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_verify_steps_emit_exactly_the_plain_tokens(tiny_models, params):
    """Greedy through the kernels (interpreter); sampled through the references, to keep CI short."""
    with use_reference(params is SAMPLED):
        _check_verify_steps_emit_plain_tokens(tiny_models, params)


def _check_verify_steps_emit_plain_tokens(tiny_models, params):
    model_dir, _ = tiny_models["llama"]
    plain = _plain_tokens(model_dir, params, 24)
    runner = _runner(model_dir, max_verify_tokens=8)
    logits = _prefill(runner, PROMPTS)
    temperature, top_k, top_p, seeds = params
    offsets = torch.zeros(2, dtype=torch.int64)
    first = ops.sample(logits, temperature, top_k, top_p, seeds, offsets)
    runner.start_decode(first, [0, 1], temperature, top_k, top_p, seeds, offsets)
    got = [[t] for t in first.tolist()]
    for step in range(5):
        # Row 0: a chain of the true next tokens, then wrong ones; row 1: a tree whose second
        # branch is the right one, or all-wrong drafts on odd steps.
        n0 = len(got[0])
        chain = plain[0][n0:n0 + 3] + [95, 94]
        right = plain[1][len(got[1])]
        tree1 = [0, (right + 1) % 96, right, 93] if step % 2 == 0 else [0, 90, 91, 92]
        tokens = torch.tensor([[0] + chain, tree1 + [0, 0]])
        parents = torch.tensor([[-1, 0, 1, 2, 3, 4], [-1, 0, 0, 2, 0, 0]], dtype=torch.int32)
        out, count = runner.verify_sample_step(tokens, parents, torch.tensor([6, 4], dtype=torch.int32))
        for row in range(2):
            got[row] += out[row, :int(count[row]) + 1].tolist()
        if step % 2 == 0:
            assert int(count[1]) >= 1  # the right branch was taken
    assert int(count[0]) >= 1
    for row in range(2):
        n = min(len(got[row]), len(plain[row]))
        assert got[row][:n] == plain[row][:n]
    # A plain step after verify steps continues the same sequence.
    more = runner.decode_sample_step().tolist()
    assert [more[r] for r in range(2)] == [plain[r][len(got[r])] if len(got[r]) < len(plain[r]) else more[r]
                                           for r in range(2)]
