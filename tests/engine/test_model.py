"""The fused decode path (engine/model.py _forward_fused: RMSNorm inside the GEMV that reads it, SiLU * up
and the residual adds in GEMV epilogues) against the chain of separate ops, step by step from two KV
caches: logits and every key and value written. CPU: the Triton interpreter; GPU: compiled kernels."""

import pytest
import torch

from edgellm.engine import model
from edgellm.engine.runner import LLMEngineRunner
from edgellm.engine.switches import Switches
from edgellm.kernels import ops

from conftest import DEVICES, build_model

CHAIN = Switches(fused_gemv=False)  # the chain of separate ops, on the GPU too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,norm_rows", [("llama", 16), ("llama", 1), ("qwen3", 16), ("qwen3", 1)])
def test_fused_decode_matches_the_chain(tmp_path, family, norm_rows, device):
    """A prefill chunk of 3 tokens on two rows (one padded), then 6 decode steps of both rows, each
    through both paths from caches that start equal; qwen3 adds q/k norms and an explicit head_dim.
    norm_rows: the RMSNorm inside the GEMVs for every chunk (16: each GEMV reads x for its statistics),
    or (1) for chunks of over one row from the sums of squares that the o and down GEMVs leave."""
    fused = Switches(fused_norm_rows=norm_rows)
    build_model(family, tmp_path)
    runner = LLMEngineRunner(tmp_path, device=device, dtype="float16", max_batch_size=2, cuda_graphs=False,
                             max_kv_cache_capacity=16)
    cfg, weights, rope = runner.config, runner.weights, runner.rope
    chain_cache = runner.kv_cache
    fused_cache = type(chain_cache)(num_layers=chain_cache.data.shape[0], max_batch_size=2,
                                    num_kv_heads=chain_cache.data.shape[3], capacity=chain_cache.data.shape[4],
                                    head_dim=chain_cache.data.shape[5], dtype=chain_cache.data.dtype, device=device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=generator).to(device)
    chunks = [(tokens[:, :3], [3, 2], [0, 0])] + [(tokens[:, 3 + i:4 + i], [1, 1], [3 + i, 2 + i]) for i in range(6)]
    for hidden_ids, lens, starts in chunks:
        hidden = weights.embed[hidden_ids]
        q_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        starts = torch.tensor(starts, dtype=torch.int32, device=device)
        want = model.forward_logits(weights, cfg, chain_cache, rope, hidden, slots, starts, q_lens, switches=CHAIN)
        assert model._fusable(weights, cfg, None, hidden, ops) == (device == "cuda")
        assert not model._fusable(weights, cfg, None, hidden, ops, CHAIN)
        got = model._forward_fused(weights, cfg, fused_cache, rope, hidden, slots, starts, q_lens, starts + q_lens,
                                   ops, None, None, False, switches=fused)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2e-2 * scale, rtol=0)
        assert (got.argmax(-1) == want.argmax(-1)).all()
    for b, length in ((0, 9), (1, 8)):  # every key and value written, per slot
        slot = int(slots[b])
        written = chain_cache.data[:, :, slot, :, :length].float()
        torch.testing.assert_close(fused_cache.data[:, :, slot, :, :length].float(), written,
                                   atol=2e-2 * written.abs().max().item(), rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_is_skipped_where_it_does_not_apply(tmp_path, device):
    """LoRA rows, a calibration hook, more rows than the GEMV takes, or Switches.fused_gemv off: the chain."""
    build_model("llama", tmp_path)
    runner = LLMEngineRunner(tmp_path, device=device, dtype="float16", max_batch_size=1, cuda_graphs=False,
                             max_kv_cache_capacity=32)
    cfg, weights = runner.config, runner.weights
    hidden = weights.embed[torch.zeros(1, 1, dtype=torch.long, device=device)]
    on_gpu = device == "cuda"
    assert model._fusable(weights, cfg, None, hidden, ops) == on_gpu
    assert not model._fusable(weights, cfg, object(), hidden, ops)  # a LoRA batch
    assert not model._fusable(weights, cfg, None, weights.embed[torch.zeros(1, 17, dtype=torch.long, device=device)],
                              ops)
    hooked = type("Calibration", (), {"observe_linear": staticmethod(lambda x, w: None)})()
    assert not model._fusable(weights, cfg, None, hidden, hooked)
    assert not model._fusable(weights, cfg, None, hidden, ops, CHAIN)
