"""The vision encoders' kernels against their torch references (interpreter on CPU, compiled on the
GPU): LayerNorm, the MLP activations, block-diagonal segment attention, and the multimodal RoPE
mode of the RoPE + KV-append kernel."""

import pytest
import torch

from edgellm.kernels import activation, layer_norm, rope, rope_append, segment_attention

from test_kernels_triton import DEVICE, DTYPES, TOL, randn  # one device / dtype / tolerance table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 80), (1, 1000)])
def test_layer_norm(dtype, shape):
    x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    w, b = randn(shape[-1], dtype=dtype, seed=2), randn(shape[-1], dtype=dtype, seed=3)
    torch.testing.assert_close(layer_norm.layer_norm(x, w, b, 1e-6), layer_norm.layer_norm_ref(x, w, b, 1e-6),
                               **TOL[dtype])
    y, s = layer_norm.add_layer_norm(x, r, w, b, 1e-5)
    y_ref, s_ref = layer_norm.add_layer_norm_ref(x, r, w, b, 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


def test_layer_norm_matches_torch_module():
    x = randn(4, 48)
    ln = torch.nn.LayerNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ln.weight.copy_(randn(48, seed=5))
        ln.bias.copy_(randn(48, seed=6))
        torch.testing.assert_close(layer_norm.layer_norm(x, ln.weight, ln.bias, 1e-6), ln(x))


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(kind, dtype):
    x = randn(3, 1500, dtype=dtype) * 3
    torch.testing.assert_close(activation.activation(x, kind), activation.activation_ref(x, kind), **TOL[dtype])


def test_activation_matches_torch():
    x = randn(777) * 4
    torch.testing.assert_close(activation.activation(x, "gelu"), torch.nn.functional.gelu(x))
    torch.testing.assert_close(activation.activation(x, "gelu_tanh"),
                               torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="unknown kind"):
        activation.activation(x, "relu6")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segments,head_dim", [([37], 16), ([5, 64, 1, 30], 80), ([16] * 6 + [9], 32)])
def test_segment_attention(dtype, segments, head_dim):
    n, heads = sum(segments), 3
    cu = [0]
    for s in segments:
        cu.append(cu[-1] + s)
    bounds, longest = segment_attention.segment_bounds(cu, DEVICE)
    qkv = randn(n, 3, heads, head_dim, dtype=dtype)
    q, k, v = qkv.unbind(1)  # strided views, as the encoders pass them
    scale = head_dim ** -0.5
    out = segment_attention.segment_attention(q, k, v, bounds, scale, longest)
    torch.testing.assert_close(out, segment_attention.segment_attention_ref(q, k, v, bounds, scale), **TOL[dtype])


def test_segment_attention_is_block_diagonal():
    """Each segment's output is attention over that segment alone, whatever is packed beside it."""
    q, k, v = (randn(20, 2, 16, seed=s) for s in range(3))
    bounds, longest = segment_attention.segment_bounds([0, 7, 20], DEVICE)
    out = segment_attention.segment_attention(q, k, v, bounds, 0.25, longest)
    alone, _ = segment_attention.segment_bounds([0, 13], DEVICE)
    tail = segment_attention.segment_attention(q[7:], k[7:], v[7:], alone, 0.25, 13)
    torch.testing.assert_close(out[7:], tail)
    probs = (torch.einsum("nhd,mhd->hnm", q[:7], k[:7]) * 0.25).softmax(-1)
    torch.testing.assert_close(out[:7], torch.einsum("hnm,mhd->nhd", probs, v[:7]))


def _cache(batch_slots, heads, capacity, head_dim, dtype):
    shape = (batch_slots, heads, capacity, head_dim)
    return torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE)


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
