"""Quantization quality tools: perplexity (edgellm/quant/quality.py) against transformers on the
default model and the shipped text, and the GPTQ int4 quantizer's error compensation on a layer."""

import math

import pytest
import torch

from edgellm.kernels import use_reference
from edgellm.quant import dequantize, quantize
from edgellm.quant.formats import _pad_groups
from edgellm.quant.gptq import gptq_int4, searched_groups, stack_rows
from edgellm.quant.quality import perplexity, token_windows


TEXT = "tests/data/eval_prose.txt"


def test_perplexity_matches_transformers(default_model_dir):
    import transformers
    from tokenizers import Tokenizer

    from edgellm.engine.runner import LLMEngineRunner

    ids = Tokenizer.from_file(str(default_model_dir / "tokenizer.json")).encode(open(TEXT).read()).ids[:700]
    runner = LLMEngineRunner(default_model_dir, device="cpu", dtype="float32", cuda_graphs=False, max_input_length=512)
    with use_reference():
        ours = perplexity(runner, ids, window=512)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in token_windows(ids, 512):
            logits = model(torch.tensor([chunk])).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum"))
            count += len(chunk) - 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 5 < ours < 100  # an English text under a small instruct model


def test_gptq_compensates_rounding_errors_where_the_inputs_live():
    """On inputs with a few strong directions, GPTQ's output error is well below round-to-nearest's
    (the weights themselves move more), and its codes are a valid int4 layout."""
    torch.manual_seed(0)
    n, k, tokens = 48, 320, 1500  # K not a multiple of the group: a ragged last group
    basis = torch.randn(k, k) * torch.logspace(0, -2, k)[None, :]
    x = torch.randn(tokens, k) @ basis.T
    w = torch.randn(n, k) * 0.05
    hessian = 2 * x.T @ x / tokens
    rtn = quantize(w, "int4")

    def output_error(qw):
        return float((x @ (dequantize(qw, torch.float32) - w).T).norm() / (x @ w.T).norm())

    for act_order in (True, False):
        gptq = gptq_int4(w, hessian, act_order=act_order)
        assert gptq.data.shape == rtn.data.shape and gptq.scales.shape == rtn.scales.shape
        assert int(gptq.zeros.max()) <= 15 and int(gptq.zeros.min()) >= 0
        assert output_error(gptq) < 0.6 * output_error(rtn)
        if act_order:  # static groups: searched_groups' scales and zeros, the codes reordered
            scales, zeros = searched_groups(w, hessian)
            assert torch.equal(gptq.scales, scales) and torch.equal(gptq.zeros, zeros)
    # a fused projection quantized in two row blocks is their rows one after another
    both = stack_rows([gptq_int4(w[:20], hessian), gptq_int4(w[20:], hessian)])
    assert torch.equal(dequantize(both, torch.float32), dequantize(gptq_int4(w, hessian), torch.float32))


def test_searched_groups_never_round_worse_than_the_full_range():
    """Each group's searched range has an H-weighted rounding error at most plain rounding's (the
    full range is one of the candidates, and alone it gives rounding's scales and zeros); with
    outliers in the weights some groups choose a clipped range, and the total error drops."""
    torch.manual_seed(1)
    n, k = 16, 320
    w = torch.randn(n, k) * 0.05
    w[torch.rand(n, k) < 0.01] *= 8  # a few outliers widen their groups' ranges
    hessian = torch.diag(torch.rand(k) + 0.1)
    energy = torch.cat([torch.diag(hessian), torch.zeros(384 - k)]).reshape(1, -1, 128)

    def group_errors(scales, zeros):
        grouped = _pad_groups(w, 128)
        codes = torch.round(grouped / scales[..., None] + zeros[..., None]).clamp(0, 15)
        return (((codes - zeros[..., None]) * scales[..., None] - grouped) ** 2 * energy).sum(2)

    rtn = quantize(w, "int4")
    full = searched_groups(w, hessian, shrinks=(1.0,))
    assert torch.equal(full[0], rtn.scales) and torch.equal(full[1], rtn.zeros)
    searched, rounded = group_errors(*searched_groups(w, hessian)), group_errors(*full)
    assert bool((searched <= rounded).all())
    assert float(searched.sum()) < 0.95 * float(rounded.sum())


def test_calibration_sees_each_linear_input(tiny_models):
    """calibrate's H for the first layer's qkv is 2/n x^T x of that layer's normed inputs (computed
    here by hand from the embeddings), over windows of 8 and 3 tokens."""
    from edgellm.engine.runner import LLMEngineRunner
    from edgellm.quant.gptq import calibrate

    model_dir, model = tiny_models["llama"]
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", cuda_graphs=False, max_input_length=64)
    ids = [5, 9, 13, 7, 30, 20, 21, 22, 23, 24, 25]
    with use_reference():
        calibration = calibrate(runner, ids, window=8)  # windows of 8 and 3 tokens
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
    got = calibration[id(runner.weights.layers[0].qkv)]
    torch.testing.assert_close(got.float(), 2 * x.T @ x / len(ids), rtol=1e-4, atol=1e-5)
    assert len(calibration) == 4 * len(runner.weights.layers)  # every layer linear weight
