"""The speculative-verification kernels against their torch references: tree masks, tree-masked
attention, RoPE at explicit positions, acceptance, KV compaction. Interpreter on CPU (CI); compiled
on a GPU (bench/gpu_check.sh)."""

import random

import pytest
import torch

from edgellm.kernels import attention, kv_compact, rope, rope_append, tree_accept, tree_attention, tree_mask

from test_kernels_triton import DEVICE, TOL, randn


def random_trees(batch, t, seed, vocab=12):
    """parents [B, T] (parent before child, node 0 the root), n_nodes [B], tokens [B, T] with
    distinct tokens among siblings."""
    rng = random.Random(seed)
    parents = torch.full((batch, t), -1, dtype=torch.int32)
    tokens = torch.zeros(batch, t, dtype=torch.int64)
    nodes = torch.tensor([rng.randint(1, t) for _ in range(batch)], dtype=torch.int32)
    for b in range(batch):
        used = {}
        for i in range(1, t):
            parent = rng.randrange(i) if rng.random() < 0.7 else i - 1
            free = [x for x in range(vocab) if x not in used.setdefault(parent, set())]
            token = rng.choice(free) if free else 0
            used[parent].add(token)
            parents[b, i], tokens[b, i] = parent, token
    return parents.to(DEVICE), nodes.to(DEVICE), tokens.to(DEVICE)


@pytest.mark.parametrize("t", [5, 64])
def test_tree_mask_ref_is_ancestors_and_self(t):
    """The reference walk against a direct reading of the definition (and the bit conversions)."""
    parents, nodes, _ = random_trees(4, t, seed=t)
    bits, depth = tree_mask.tree_mask_ref(parents, nodes)
    mask = tree_mask.bits_to_mask(bits).cpu()
    for b in range(4):
        for i in range(t):
            chain, node = {i}, i
            while i < int(nodes[b]) and int(parents[b, node]) >= 0:
                node = int(parents[b, node])
                chain.add(node)
            assert set(torch.nonzero(mask[b, i]).flatten().tolist()) == chain and int(depth[b, i]) == len(chain) - 1
    assert torch.equal(tree_mask.mask_to_bits(tree_mask.bits_to_mask(bits)), bits)


def test_tree_mask_of_a_chain_is_causal():
    t = 7
    parents = torch.arange(-1, t - 1, dtype=torch.int32, device=DEVICE)[None]
    bits, depth = tree_mask.tree_mask_ref(parents, torch.tensor([t], dtype=torch.int32, device=DEVICE))
    assert torch.equal(tree_mask.bits_to_mask(bits)[0], torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril())
    assert depth[0].tolist() == list(range(t))


@pytest.mark.parametrize("t", [1, 4, 16])
def test_accept_tree(t):
    parents, nodes, tokens = random_trees(6, t, seed=10 + t, vocab=4)
    # Targets that follow the tree for a while: each node's target is one of its children's tokens
    # (or a token no child has), so paths of every length occur.
    rng = random.Random(t)
    targets = torch.tensor([[rng.randrange(5) for _ in range(t)] for _ in range(6)], device=DEVICE)
    path, count, out = tree_accept.accept_tree(tokens, parents, nodes, targets)
    path_ref, count_ref, out_ref = tree_accept.accept_tree_ref(tokens, parents, nodes, targets)
    assert torch.equal(count, count_ref)
    for b in range(6):
        n = int(count_ref[b]) + 1
        assert torch.equal(path[b, :n], path_ref[b, :n]) and torch.equal(out[b, :n], out_ref[b, :n])


def test_accept_tree_walks_the_matching_branch():
    # root -> a(5) -> c(7); root -> b(6) -> d(8). Targets pick b after the root, then d, then 9.
    parents = torch.tensor([[-1, 0, 0, 1, 2]], dtype=torch.int32, device=DEVICE)
    tokens = torch.tensor([[0, 5, 6, 7, 8]], device=DEVICE)
    targets = torch.tensor([[6, 1, 8, 1, 9]], device=DEVICE)
    path, count, out = tree_accept.accept_tree(tokens, parents, torch.tensor([5], dtype=torch.int32, device=DEVICE),
                                               targets)
    assert count.tolist() == [2] and path[0, :3].tolist() == [0, 2, 4] and out[0, :3].tolist() == [6, 8, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_compact(dtype):
    t, batch = 8, 3
    parents, nodes, tokens = random_trees(batch, t, seed=3, vocab=3)
    targets = torch.randint(0, 4, (batch, t), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    path, count, _ = tree_accept.accept_tree_ref(tokens, parents, nodes, targets)
    path[0, 1:4], count[0] = torch.tensor([2, 5, 7]), 3  # a long non-chain path too
    cache = randn(2, 2, batch + 1, 3, 20, 12, dtype=dtype)
    original, expected = cache.clone(), cache.clone()
    slots = torch.tensor([3, 0, 1], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    kv_compact.kv_compact(cache, slots, starts, path.to(DEVICE), count.to(DEVICE))
    kv_compact.kv_compact_ref(expected, slots, starts, path.to(DEVICE), count.to(DEVICE))
    assert torch.equal(cache, expected)
    assert torch.equal(cache[:, :, 3, :, 1:4], original[:, :, 3, :, torch.tensor([2, 5, 7])])
    assert torch.equal(cache[:, :, 2], original[:, :, 2])  # other slots untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,t", [(4, 4, 64, 16), (8, 2, 48, 5), (9, 3, 64, 8)])
def test_tree_attention(dtype, hq, hkv, head_dim, t):
    parents, nodes, _ = random_trees(3, t, seed=4)
    bits, _ = tree_mask.tree_mask_ref(parents, nodes)
    k_cache = randn(4, hkv, 200, head_dim, dtype=dtype)
    v_cache = randn(4, hkv, 200, head_dim, dtype=dtype, seed=1)
    q = randn(3, t, hq, head_dim, dtype=dtype, seed=2)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor([0, 21, 170], device=DEVICE), nodes)
    out = tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5)
    ref = tree_attention.tree_attention_ref(q, k_cache, v_cache, *args, bits, head_dim ** -0.5)
    for b in range(3):
        n = int(nodes[b])
        torch.testing.assert_close(out[b, :n], ref[b, :n], **TOL[dtype])
    assert torch.isfinite(out).all()  # padding nodes too
    # A chain's tree attention is causal attention over the chunk.
    chain = tree_mask.mask_to_bits(torch.ones(3, t, t, dtype=torch.bool, device=DEVICE).tril())
    full = torch.full((3,), t, dtype=torch.int32, device=DEVICE)
    causal = attention.prefill_attention_ref(q, k_cache, v_cache, *args[:2], full, head_dim ** -0.5)
    torch.testing.assert_close(tree_attention.tree_attention(q, k_cache, v_cache, *args[:2], full, chain,
                                                             head_dim ** -0.5), causal, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tree_attention_with_a_sliding_window(dtype):
    """Each node's window is measured from the position it takes once accepted: a chain's tree
    attention under a window is causal windowed attention over the chunk."""
    t, window, hq, hkv, head_dim = 8, 11, 4, 2, 32
    parents, nodes, _ = random_trees(3, t, seed=5)
    bits, _ = tree_mask.tree_mask_ref(parents, nodes)
    k_cache, v_cache = randn(4, hkv, 120, head_dim, dtype=dtype), randn(4, hkv, 120, head_dim, dtype=dtype, seed=1)
    q = randn(3, t, hq, head_dim, dtype=dtype, seed=2)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor([0, 21, 100], device=DEVICE), nodes)
    out = tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, window)
    ref = tree_attention.tree_attention_ref(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, window)
    for b in range(3):
        n = int(nodes[b])
        torch.testing.assert_close(out[b, :n], ref[b, :n], **TOL[dtype])
    assert torch.isfinite(out).all()
    chain = tree_mask.mask_to_bits(torch.ones(3, t, t, dtype=torch.bool, device=DEVICE).tril())
    full = torch.full((3,), t, dtype=torch.int32, device=DEVICE)
    causal = attention.prefill_attention_ref(q, k_cache, v_cache, *args[:2], full, head_dim ** -0.5, window)
    torch.testing.assert_close(tree_attention.tree_attention(q, k_cache, v_cache, *args[:2], full, chain,
                                                             head_dim ** -0.5, window), causal, **TOL[dtype])
    with pytest.raises(ValueError, match="longer than the tree"):
        tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_append_at_explicit_positions(dtype):
    batch, seq, hq, hkv, head_dim, capacity = 2, 6, 4, 2, 32, 40
    q, k, v = randn(batch, seq, hq, head_dim, dtype=dtype), randn(batch, seq, hkv, head_dim, dtype=dtype, seed=1), \
        randn(batch, seq, hkv, head_dim, dtype=dtype, seed=2)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), capacity)
    caches = [randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=s) for s in (3, 4)]
    slots = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([seq, 4], dtype=torch.int32, device=DEVICE)
    positions = starts[:, None] + torch.tensor([[0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]], device=DEVICE)
    got, want = [c.clone() for c in caches], [c.clone() for c in caches]
    q_out = rope_append.rope_kv_append(q, k, v, cos, sin, *got, slots, starts, lens, positions)
    q_ref = rope_append.rope_kv_append_ref(q, k, v, cos, sin, *want, slots, starts, lens, positions)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    assert torch.equal(got[1], want[1])
    # positions = starts + i is the default.
    plain = rope_append.rope_kv_append(q, k, v, cos, sin, *[c.clone() for c in caches], slots, starts, lens)
    explicit = starts[:, None] + torch.arange(seq, device=DEVICE)
    torch.testing.assert_close(rope_append.rope_kv_append(q, k, v, cos, sin, *[c.clone() for c in caches], slots,
                                                          starts, lens, explicit), plain)


def _packed_trees(batch, t, seed, vocab):
    parents, nodes, tokens = random_trees(batch, t, seed, vocab)
    tokens[:, 0] = 999  # node 0's packed token is a placeholder: the root comes from `roots`
    return torch.cat([tokens, parents.long(), nodes.long()[:, None]], 1).contiguous()


@pytest.mark.parametrize("t", [1, 5, 16, 64])
def test_tree_inputs(t):
    from edgellm.kernels import tree_step

    batch, vocab, hidden, scratch = 3, 40, 24, 5
    packed = _packed_trees(batch, t, seed=t, vocab=vocab)
    roots = torch.tensor([7, 8, 9], device=DEVICE)
    lengths = torch.tensor([4, 11, 0, 2, 30, 17], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([1, scratch, 4], dtype=torch.int32, device=DEVICE)  # the middle row is padding
    offsets = torch.tensor([3, 0, 100], device=DEVICE)
    embed = randn(vocab + 1000, hidden, seed=2)
    got = tree_step.tree_inputs(packed, roots, lengths, slots, offsets, embed, scratch)
    want = tree_step.tree_inputs_ref(packed, roots, lengths, slots, offsets, embed, scratch)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.starts.tolist() == [11, 0, 30] and got.tokens[:, 0].tolist() == [7, 8, 9]


def test_tree_commit():
    from edgellm.kernels import tree_step

    t, scratch = 6, 3
    count = torch.tensor([0, 4, 2], dtype=torch.int32, device=DEVICE)
    out = torch.arange(18, device=DEVICE).view(3, t) + 100
    starts = torch.tensor([5, 9, 0], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([2, 0, scratch], dtype=torch.int32, device=DEVICE)
    states = []
    for fn in (tree_step.tree_commit, tree_step.tree_commit_ref):
        lengths = torch.tensor([1, 1, 1, 1], dtype=torch.int32, device=DEVICE)
        offsets = torch.tensor([10, 20, 30], device=DEVICE)
        last = torch.zeros(4, dtype=torch.int64, device=DEVICE)  # a padded batch: rows beyond B are untouched
        result = torch.zeros(4, t + 1, dtype=torch.int64, device=DEVICE)
        fn(count, out, starts, slots, lengths, offsets, last, result, scratch)
        states.append((lengths, offsets, last, result))
    for a, b in zip(*states):
        assert torch.equal(a, b)
    lengths, offsets, last, result = states[0]
    assert lengths.tolist() == [14, 1, 6, 1] and offsets.tolist() == [11, 25, 33]
    assert last.tolist() == [100, 110, 114, 0] and result[1].tolist() == [106, 107, 108, 109, 110, 111, 4]


def test_sampling_groups_share_settings_not_offsets():
    """sample(group=G): logits row r uses the settings of row r // G and its own RNG offset, as if
    each settings row were repeated G times."""
    from edgellm.kernels import sampling

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
