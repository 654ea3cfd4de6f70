"""kernels/rope_append.py: RoPE and the KV append in one kernel, at cache, explicit and multimodal positions.
Against the torch reference (`_ref`) on fresh random inputs of several shapes, odd sizes included
(tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import rope, rope_append

from kernel_cases import DEVICE, TOL, randn


def _cache(batch_slots, heads, capacity, head_dim, dtype):
    shape = (batch_slots, heads, capacity, head_dim)
    return torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim,seq", [(4, 2, 64, 64, 5), (8, 1, 96, 64, 1), (6, 2, 48, 48, 4)])
def test_rope_kv_append(dtype, hq, hkv, head_dim, rotary_dim, seq):

    batch, capacity = 3, 24
    qkv = randn(batch, seq, (hq + 2 * hkv) * head_dim, dtype=dtype)
    q = qkv[..., :hq * head_dim].reshape(batch, seq, hq, head_dim)  # strided views, like the model's
    k = qkv[..., hq * head_dim:(hq + hkv) * head_dim].reshape(batch, seq, hkv, head_dim)
    v = qkv[..., (hq + hkv) * head_dim:].reshape(batch, seq, hkv, head_dim)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(rotary_dim, 10000.0).to(DEVICE), capacity)
    k_cache = randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=3)
    v_cache = randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=4)
    slots, starts = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([2, 0, 3], [0, 7, capacity - seq]))
    lens = torch.tensor([seq, max(seq - 2, 1), seq], dtype=torch.int32, device=DEVICE)  # row 1 padded
    kr, vr = k_cache.clone(), v_cache.clone()
    q_out = rope_append.rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lens)
    q_ref = rope_append.rope_kv_append_ref(q, k, v, cos, sin, kr, vr, slots, starts, lens)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_cache, kr, **TOL[dtype])
    assert torch.equal(v_cache, vr)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_append_mrope(dtype):
    batch, seq, hq, hk, head_dim = 2, 5, 4, 2, 16
    sections = (2, 3, 3)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), 64)
    q, k, v = randn(batch, seq, hq, head_dim, dtype=dtype), randn(batch, seq, hk, head_dim, dtype=dtype, seed=1), \
        randn(batch, seq, hk, head_dim, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 40, (batch, seq, 3), generator=g).to(DEVICE)
    slots = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([5, 4], dtype=torch.int32, device=DEVICE)
    outs = []
    for fn in (rope_append.rope_kv_append, rope_append.rope_kv_append_ref):
        kc, vc = _cache(3, hk, 16, head_dim, dtype)
        outs.append((fn(q, k, v, cos, sin, kc, vc, slots, starts, lengths, positions, sections=sections), kc, vc))
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, **TOL[dtype])
    # Equal t, h, w is plain RoPE at that position.
    flat = positions[..., 0]
    kc, vc = _cache(3, hk, 16, head_dim, dtype)
    same = rope_append.rope_kv_append(q, k, v, cos, sin, kc, vc, slots, starts, lengths,
                                      flat[..., None].expand(-1, -1, 3), sections=sections)
    torch.testing.assert_close(same, rope_append.rope_kv_append_ref(q, k, v, cos, sin, *_cache(3, hk, 16, head_dim, dtype),
                                                                    slots, starts, lengths, flat), **TOL[dtype])


def test_rope_kv_append_offsets():
    """A per-slot offset shifts the rotary position of implicit and explicit 1-D positions."""
    batch, seq, hq, hk, head_dim = 2, 3, 2, 1, 8
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), 64)
    q, k, v = randn(batch, seq, hq, head_dim), randn(batch, seq, hk, head_dim, seed=1), randn(batch, seq, hk, head_dim, seed=2)
    slots = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([10, 4], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([3, 3], dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor([0, -6, 0, 9], dtype=torch.int32, device=DEVICE)
    kc, vc = _cache(4, hk, 32, head_dim, torch.float32)
    got = rope_append.rope_kv_append(q, k, v, cos, sin, kc, vc, slots, starts, lengths, offsets=offsets)
    shifted = (starts.long() + offsets[slots.long()].long())[:, None] + torch.arange(seq, device=DEVICE)
    kc2, vc2 = _cache(4, hk, 32, head_dim, torch.float32)
    want = rope_append.rope_kv_append_ref(q, k, v, cos, sin, kc2, vc2, slots, starts, lengths, shifted)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(kc, kc2)
    kc3, vc3 = _cache(4, hk, 32, head_dim, torch.float32)
    ref = rope_append.rope_kv_append_ref(q, k, v, cos, sin, kc3, vc3, slots, starts, lengths, offsets=offsets)
    torch.testing.assert_close(ref, want)
