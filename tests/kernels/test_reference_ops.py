"""The torch reference ops against independent implementations (torch SDPA, transformers modules)."""

import pytest
import torch
import torch.nn.functional as F

from edgellm import kernels
from edgellm.kernels.attention import decode_attention_ref, prefill_attention_ref
from edgellm.kernels.kv_append import kv_append_ref
from edgellm.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from edgellm.kernels.rope import apply_rope_ref, rope_cos_sin_cache_ref
from edgellm.kernels.glu import glu_ref
from edgellm.kernels.vocab_remap import vocab_remap_ref


def _filled_cache(batch, hkv, capacity, d, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(batch, hkv, capacity, d)
    v_cache = torch.zeros(batch, hkv, capacity, d)
    for b, n in enumerate(lengths):
        k_cache[b, :, :n] = torch.randn(hkv, n, d, generator=g)
        v_cache[b, :, :n] = torch.randn(hkv, n, d, generator=g)
    return k_cache, v_cache


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_prefill_attention_matches_sdpa(hq, hkv):
    d, capacity, starts, q_lens = 16, 24, [0, 5, 3], [7, 4, 1]
    k_cache, v_cache = _filled_cache(3, hkv, capacity, d, [s + n for s, n in zip(starts, q_lens)])
    q = torch.randn(3, 7, hq, d)
    slots = torch.tensor([2, 0, 1])
    # Slot order differs from row order: row b reads slot slots[b].
    k_cache, v_cache = k_cache[[1, 2, 0]], v_cache[[1, 2, 0]]
    out = prefill_attention_ref(q, k_cache, v_cache, slots, torch.tensor(starts), torch.tensor(q_lens), 0.25)
    for b in range(3):
        n, s = q_lens[b], starts[b]
        keys = k_cache[slots[b], :, :s + n].repeat_interleave(hq // hkv, 0)
        values = v_cache[slots[b], :, :s + n].repeat_interleave(hq // hkv, 0)
        mask = torch.arange(s + n)[None, :] <= (s + torch.arange(n))[:, None]
        ref = F.scaled_dot_product_attention(q[b, :n].transpose(0, 1), keys, values, attn_mask=mask, scale=0.25)
        torch.testing.assert_close(out[b, :n], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
        assert out[b, n:].abs().sum() == 0


def test_decode_attention_equals_prefill_of_one_token():
    k_cache, v_cache = _filled_cache(2, 2, 20, 8, [9, 17], seed=1)
    q = torch.randn(2, 4, 8)
    lengths = torch.tensor([9, 17])
    out = decode_attention_ref(q, k_cache, v_cache, torch.tensor([0, 1]), lengths, 0.3)
    ref = prefill_attention_ref(q[:, None], k_cache, v_cache, torch.tensor([0, 1]), lengths - 1,
                                    torch.ones(2, dtype=torch.int64), 0.3)[:, 0]
    torch.testing.assert_close(out, ref)


def test_kv_append_writes_only_real_tokens():
    k_cache = torch.zeros(3, 2, 10, 4)
    v_cache = torch.zeros(3, 2, 10, 4)
    k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4)
    kv_append_ref(k_cache, v_cache, k, v, torch.tensor([2, 0]), torch.tensor([3, 0]), torch.tensor([5, 2]))
    torch.testing.assert_close(k_cache[2, :, 3:8], k[0].transpose(0, 1))
    torch.testing.assert_close(v_cache[0, :, 0:2], v[1, :2].transpose(0, 1))
    assert k_cache[0, :, 2:].abs().sum() == 0 and k_cache[1].abs().sum() == 0 and k_cache[2, :, :3].abs().sum() == 0


def test_rms_norm_and_rope_match_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    x = torch.randn(2, 5, 32)
    norm = LlamaRMSNorm(32, eps=1e-5)
    norm.weight.data.normal_()
    torch.testing.assert_close(rms_norm_ref(x, norm.weight.data, 1e-5), norm(x))
    residual = torch.randn(2, 5, 32)
    y, summed = add_rms_norm_ref(x, residual, norm.weight.data, 1e-5)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(y, norm(x + residual))

    inv_freq = kernels.rope_inv_freq(8, 10000.0)
    cos, sin = rope_cos_sin_cache_ref(inv_freq, 64)
    q, k = torch.randn(2, 5, 4, 12), torch.randn(2, 5, 2, 12)
    positions = torch.tensor([[0, 1, 2, 3, 4], [30, 31, 32, 33, 34]])
    q_out, k_out = apply_rope_ref(q, k, cos, sin, positions)
    # transformers' layout: [B, H, S, D], cos/sin duplicated over both halves; partial rotary = 8 of 12.
    c = torch.cat([cos[positions], cos[positions]], -1)
    s = torch.cat([sin[positions], sin[positions]], -1)
    q_ref, k_ref = apply_rotary_pos_emb(q[..., :8].transpose(1, 2), k[..., :8].transpose(1, 2), c, s)
    torch.testing.assert_close(q_out[..., :8], q_ref.transpose(1, 2))
    torch.testing.assert_close(k_out[..., :8], k_ref.transpose(1, 2))
    assert torch.equal(q_out[..., 8:], q[..., 8:])


def test_glu_and_vocab_remap():
    gate_up = torch.randn(3, 10)
    torch.testing.assert_close(glu_ref(gate_up), F.silu(gate_up[:, :5]) * gate_up[:, 5:])
    table = torch.tensor([7, 3, 100, 42])
    assert vocab_remap_ref(torch.tensor([[2, 0], [3, 1]]), table).tolist() == [[100, 7], [42, 3]]
