"""Weight-only quantization at load (int8, int4, fp8) against transformers running the same
fake-quantized weights (each linear weight replaced by dequantize(quantize(W))) in float32: greedy
token-identical, LoRA on a quantized base too; bad settings give clear errors."""

import copy

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.memory import engine_memory_plan
from edgellm.errors import ConfigurationError
from edgellm.quant import dequantize, quantize

from conftest import ALL_PROJECTIONS as PROJECTIONS, assert_rows_match_transformers

PROMPTS = [[5, 9, 13, 7, 30], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]


def fake_quantized(model, kind, lm_head=False, group=128):
    """A copy of a transformers model whose linear weights are what edgellm's kind decodes to."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in PROJECTIONS or (lm_head and name == "lm_head"):
                module.weight.copy_(dequantize(quantize(module.weight.detach(), kind, group=group), torch.float32))
    return model


def test_int4_packing_by_hand():
    """formats.py's int4 layout, written out: in each block of 32 columns byte j holds column j (low
    nibble) and column 16 + j (high); a ragged K is padded with zero codes."""
    from edgellm.quant.formats import pack_int4, unpack_int4

    codes = (torch.arange(2 * 40) % 16).reshape(2, 40).to(torch.uint8)  # row 1 starts at code 8
    packed = pack_int4(codes)
    assert packed.shape == (2, 32) and packed.dtype == torch.uint8
    assert packed[0, 0] == 0 | (0 << 4)  # columns 0 and 16: codes 0 and 0
    assert packed[0, 3] == 3 | (3 << 4)  # columns 3 and 19
    assert packed[1, 5] == 13 | (13 << 4)  # row 1: code (40 + c) % 16 = (8 + c) % 16: columns 5 and 21
    assert packed[0, 16 + 2] == 2 | (0 << 4)  # second block: column 34 (code 2), column 50 is padding
    assert torch.equal(unpack_int4(packed, 40), codes)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_greedy_tokens_match_transformers_on_the_same_weights(tiny_models, kind):
    model_dir, model = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, quantization=kind)
    assert runtime.config.quantization == kind
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                           max_generate_length=16, temperature=0))
    assert_rows_match_transformers(response, fake_quantized(model, kind), PROMPTS, 16)


def test_quantized_lm_head(tiny_models):
    model_dir, model = tiny_models["llama"]  # untied: its own LM head
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, quantization="int4",
                                  quantize_lm_head=True)
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                           max_generate_length=16, temperature=0))
    assert_rows_match_transformers(response, fake_quantized(model, "int4", lm_head=True), PROMPTS, 16)


def test_lora_on_a_quantized_base(tiny_models, lora_adapters):
    import peft

    model_dir, model = tiny_models["llama"]
    adapter_dir = lora_adapters["a"][0]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, quantization="int8",
                                  lora_weights={"a": adapter_dir})
    reference = peft.PeftModel.from_pretrained(fake_quantized(model, "int8"), adapter_dir).merge_and_unload().eval()
    response = runtime.handle_request(LLMGenerationRequest(
        requests=[{"input_ids": p, "lora_weights_name": "a"} for p in PROMPTS], max_generate_length=12, temperature=0))
    assert_rows_match_transformers(response, reference, PROMPTS, 12)


@pytest.mark.reference_ops
def test_the_memory_plan_counts_packed_bytes(tiny_models):
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", cuda_graphs=False, quantization="int4")
    cfg = runtime.config
    plans = {kind: engine_memory_plan(cfg.__class__(**{**cfg.__dict__, "quantization": kind}), torch.float32,
                                      prefill_chunk=64, graphs=False).items[0].nbytes for kind in (None, "int8", "int4")}
    assert plans[None] > plans["int8"] > plans["int4"]
    held = sum(t.nbytes for layer in runtime.runner.weights.layers for t in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    linear = sum(p.numel() for n, p in tiny_models["llama"][1].named_parameters() if n.split(".")[-2] in PROJECTIONS)
    assert held < linear * 4 / 4  # packed int4 plus group scales and zeros: under a quarter of float32


@pytest.mark.reference_ops
def test_bad_quantization_settings(tiny_models):
    model_dir = tiny_models["llama"][0]
    with pytest.raises(ConfigurationError, match="unsupported quantization 'int3'.*int8, int4, fp8"):
        LLMInferenceRuntime(model_dir, device="cpu", quantization="int3")
    with pytest.raises(ConfigurationError, match="quantize_lm_head needs a quantization"):
        LLMInferenceRuntime(model_dir, device="cpu", quantize_lm_head=True)


@pytest.mark.reference_ops
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_edgellm_quantize_writes_a_directory_that_loads_quantized(tiny_models, tmp_path, capsys, kind):
    """`edgellm quantize` then a plain load: transformers' tokens over the same quantized weights (int4 in
    groups of 32 here), and the checkpoint holds packed tensors for the linear weights only."""
    from safetensors import safe_open

    from edgellm.cli import main

    model_dir, model = tiny_models["llama"]
    out = tmp_path / f"llama-{kind}"
    assert main(["quantize", str(model_dir), "--to", kind, "--output", str(out), "--group-size", "32",
                 "--method", "rtn"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert "model.embed_tokens.weight" in names and (out / "tokenizer.json").is_file()
    stored = LLMInferenceRuntime(out, device="cpu", cuda_graphs=False)
    assert (stored.config.quantization, stored.config.quant_method) == (kind, "edgellm")
    response = stored.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                          max_generate_length=10, temperature=0))
    assert_rows_match_transformers(response, fake_quantized(model, kind, group=32), PROMPTS, 10)
    assert main(["quantize", str(model_dir), "--to", kind, "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.reference_ops
def test_edgellm_quantize_int4_runs_gptq(tiny_models, tmp_path, capsys):
    """int4's default method: GPTQ calibrated on a text (act order, static groups from a search
    over shrunk ranges; the value projection rounded to nearest), written in the same
    layout; the stored directory generates transformers' tokens over those weights."""
    from safetensors.torch import load_file

    from conftest import WORDS
    from edgellm.cli import main
    from edgellm.quant.formats import QuantizedWeight
    from edgellm.quant.gptq import RANGE_SHRINKS

    model_dir, model = tiny_models["llama"]
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(300)))
    out = tmp_path / "llama-gptq"
    assert main(["quantize", str(model_dir), "--to", "int4", "--output", str(out), "--group-size", "32",
                 "--calibration", str(text), "--device", "cpu"]) == 0
    stored, original = load_file(str(out / "model.safetensors")), dict(model.named_parameters())
    fake = copy.deepcopy(model)
    changed = 0
    with torch.no_grad():
        for name, module in fake.named_modules():
            if name.split(".")[-1] not in PROJECTIONS:
                continue
            w = original[name + ".weight"].detach()
            qw = QuantizedWeight("int4", stored[name + ".qweight"], stored[name + ".scales"], stored[name + ".zeros"],
                                 w.shape[1], 32)
            rtn = quantize(w, "int4", group=32)
            if name.endswith("v_proj"):
                assert torch.equal(qw.data, rtn.data)
                assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
            else:  # each group's range: rounding's, or that shrunk by one of the searched factors
                ratio = qw.scales / rtn.scales
                assert bool(((ratio - torch.tensor(RANGE_SHRINKS)[:, None, None]).abs() < 1e-5).any(0).all())
                changed += not torch.equal(qw.data, rtn.data)
            module.weight.copy_(dequantize(qw, torch.float32))
    assert changed == len(model.model.layers) * 6  # GPTQ moved codes in every other projection
    runtime = LLMInferenceRuntime(out, device="cpu", cuda_graphs=False)
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                           max_generate_length=10, temperature=0))
    assert_rows_match_transformers(response, fake, PROMPTS, 10)
    assert main(["quantize", str(model_dir), "--to", "int8", "--method", "gptq", "--output", str(tmp_path / "x")]) == 2
    assert "gptq int4" in capsys.readouterr().err
