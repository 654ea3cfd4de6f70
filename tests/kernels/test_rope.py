"""kernels/rope.py: the cos/sin cache (every RoPE scaling) and applying it. Against the torch reference
(`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import rope

from kernel_cases import DEVICE, DTYPES, TOL, randn


@pytest.mark.parametrize("rotary_dim,theta,scaling", [
    (64, 10000.0, None), (32, 1e6, None),
    (128, 5e5, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192})])
def test_rope_cos_sin_cache(rotary_dim, theta, scaling):
    inv_freq = rope.rope_inv_freq(rotary_dim, theta, scaling).to(DEVICE)
    cos, sin = rope.rope_cos_sin_cache(inv_freq, 777)
    cos_ref, sin_ref = rope.rope_cos_sin_cache_ref(inv_freq, 777)
    torch.testing.assert_close(cos, cos_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(sin, sin_ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim", [(4, 4, 64, 64), (8, 2, 48, 48), (8, 1, 96, 64),
                                                         (4, 1, 128, 128)])
def test_apply_rope(dtype, hq, hkv, head_dim, rotary_dim):
    batch, seq = 2, 5
    qkv = randn(batch, seq, (hq + 2 * hkv) * head_dim, dtype=dtype)
    q = qkv[..., :hq * head_dim].reshape(batch, seq, hq, head_dim)  # strided, like the model's
    k = qkv[..., hq * head_dim:(hq + hkv) * head_dim].reshape(batch, seq, hkv, head_dim)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(rotary_dim, 10000.0).to(DEVICE), 64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21]], device=DEVICE)
    q_out, k_out = rope.apply_rope(q, k, cos, sin, positions)
    q_ref, k_ref = rope.apply_rope_ref(q, k, cos, sin, positions)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])
