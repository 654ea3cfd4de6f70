"""The persistent decode kernel (megakernel.py, a trial outside the package) against its reference, the
kernel chain (model.forward_logits): teacher-forced decode steps from two KV caches, logits and cache
contents compared at every step. CPU: the interpreter, one program. GPU: one program per SM, so the
stages' counters and waits are exercised too.
Run from the repository root: `TRITON_INTERPRET=1 python -m pytest bench/trials/persistent` (CPU) or
`python -m pytest bench/trials/persistent` (GPU). Not part of CI: the package does not use this kernel."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2] / "tests")]

from conftest import build_model, write_tokenizer  # noqa: E402  (first: it turns the interpreter on without a GPU)
import megakernel  # noqa: E402
from edgellm.engine.kv_cache import LinearKVCache  # noqa: E402
from edgellm.engine.model import forward_logits  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402
from edgellm.kernels import ops  # noqa: E402
from step import persistent_logits  # noqa: E402


def _teacher_forced(model_dir, device, dtype, steps, programs=None, tile_programs=None, min_keys=None, seed=0):
    runner = LLMEngineRunner(model_dir, device=device, dtype=dtype, max_batch_size=2, cuda_graphs=False,
                             max_kv_cache_capacity=steps + 8)
    cfg, weights, rope = runner.config, runner.weights, runner.rope
    assert megakernel.supports(cfg, weights, runner.dtype) is None
    chain_cache = runner.kv_cache
    data = chain_cache.data
    mega_cache = LinearKVCache(num_layers=data.shape[0], max_batch_size=2, num_kv_heads=data.shape[3],
                               capacity=data.shape[4], head_dim=data.shape[5], dtype=data.dtype, device=data.device)
    plan = megakernel.make_plan(cfg, weights, mega_cache.data, programs=programs, tile_programs=tile_programs)
    if min_keys is not None:  # slices of fewer keys: a short context is cut up and merged too
        plan.constants["MIN_KEYS"] = min_keys
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (steps,), generator=generator)
    slot = 1  # not slot 0: the slot offset is part of what is checked
    slots = torch.tensor([slot], dtype=torch.int32, device=runner.device)
    q_lens = torch.ones(1, dtype=torch.int32, device=runner.device)
    worst = 0.0
    for step, token in enumerate(tokens.tolist()):
        embeds = weights.embed[token][None, None]
        starts = torch.tensor([step], dtype=torch.int32, device=runner.device)
        want = forward_logits(weights, cfg, chain_cache, rope, embeds, slots, starts, q_lens)
        got = persistent_logits(plan, weights, cfg, rope, embeds, slots, starts, ops)
        scale = want.abs().max().item()
        worst = max(worst, (got - want).abs().max().item() / scale)
        assert torch.allclose(got, want, atol=2e-2 * scale, rtol=0), f"step {step}: logits differ"
        gap = want.topk(2).values.diff().abs().item()  # the argmax may differ only where the chain's top two
        assert got.argmax().item() == want.argmax().item() or gap <= 2 * (got - want).abs().max().item()  # are that close
    written = data[:, :, slot, :, :steps].float()
    assert torch.allclose(mega_cache.data[:, :, slot, :, :steps].float(), written, atol=2e-2 * written.abs().max().item())
    assert plan.flag.item() == 0, "a stage wait gave up"
    assert megakernel.stage_counts(plan) == megakernel.expected_counts(plan)  # one arrival per tile, no more
    return worst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU (conftest)")
@pytest.mark.parametrize("tile_programs", [None, 64])
def test_persistent_decode_matches_the_chain_in_the_interpreter(tmp_path, tile_programs):
    """One program; tile_programs=64 cuts every stage into many tiles and (slices of 16 keys) each
    head's keys into slices merged by the last slice, as on a GPU."""
    build_model("llama", tmp_path, num_key_value_heads=2)
    write_tokenizer(tmp_path)
    _teacher_forced(tmp_path, "cpu", "float16", steps=20, tile_programs=tile_programs,
                    min_keys=16 if tile_programs else None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_persistent_decode_matches_its_torch_twin(tmp_path, device):
    """persistent_decode against persistent_decode_ref, step by step from two caches: the residual
    after the last layer and every key and value written (interpreter on the CPU, every SM on a GPU)."""
    if (device == "cuda") != torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no GPU, the native kernel where there is one")
    build_model("llama", tmp_path, num_key_value_heads=2)
    write_tokenizer(tmp_path)
    runner = LLMEngineRunner(tmp_path, device=device, dtype="float16", max_batch_size=2, cuda_graphs=False,
                             max_kv_cache_capacity=40)
    cfg, weights, rope = runner.config, runner.weights, runner.rope
    caches = [torch.zeros_like(runner.kv_cache.data) for _ in range(2)]
    plans = [megakernel.make_plan(cfg, weights, cache, tile_programs=64) for cache in caches]
    slots = torch.tensor([1], dtype=torch.int32, device=device)
    for step, token in enumerate([5, 17, 3, 44, 9, 60, 21, 8, 33, 70, 12, 2]):
        hidden = weights.embed[token]
        starts = torch.tensor([step], dtype=torch.int32, device=device)
        args = (rope.cos, rope.sin, slots, starts, cfg.rms_norm_eps, cfg.attention_scale)
        got = megakernel.persistent_decode(plans[0], hidden, *args).float()
        want = megakernel.persistent_decode_ref(plans[1], hidden, *args).float()
        assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item(), rtol=0), f"step {step}"
    assert torch.allclose(caches[0].float(), caches[1].float(), atol=2e-2 * caches[1].abs().max().item())


def test_unsupported_models_are_named():
    class Config:
        norm, mlp, activation, positions, qk_norm, embed_scale = "layer", "plain", "gelu", "learned", True, 2.0
        rotary_dim, head_dim, mrope_section, num_decoder_layers = 4, 8, None, 1

        def layer_window(self, layer):
            return 4

    class Layer:
        qkv = o_proj = gate_up = down = torch.zeros(2, 2, dtype=torch.float16)
        qkv_bias = o_bias = attn_out_norm = mlp_out_norm = None

    class Weights:
        layers = [Layer()]

    why = megakernel.supports(Config(), Weights(), torch.float16)
    for name in ("norm", "mlp", "positions", "qk_norm", "embed_scale", "sliding windows", "rotary"):
        assert name in why
    assert "dtype" in megakernel.supports(Config(), Weights(), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,min_keys", [("float16", None), ("bfloat16", None), ("float16", 16)])
def test_persistent_decode_matches_the_chain_on_gpu(tmp_path, dtype, min_keys):
    """A 4-layer GQA model, 150 steps (three key blocks), every SM a program; min_keys=16: every head's
    keys in up to SPLITS slices, merged."""
    build_model("llama", tmp_path, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, initializer_range=0.05)
    write_tokenizer(tmp_path)
    _teacher_forced(tmp_path, "cuda", dtype, steps=150, min_keys=min_keys)
