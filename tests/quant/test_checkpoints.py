"""AWQ and GPTQ 4-bit checkpoints: their packings (written here from the formats' descriptions,
independently of edgellm's unpacker) unpack to the weights they encode; a tiny llama saved in each
format generates transformers' tokens over the same dequantized weights; bad configs and tensors give
clear errors naming what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import ConfigurationError, ModelLoadError, UnsupportedModelError
from edgellm.quant import dequantize
from edgellm.quant.checkpoints import CheckpointQuantization, checkpoint_quantization, unpack

from conftest import assert_rows_match_transformers
from conftest import ALL_PROJECTIONS as PROJECTIONS

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROMPTS = [[5, 9, 13, 7, 30], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]


def random_codes(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).half()
    return codes, zeros, scales


def expected_weight(codes, zeros, scales, group):
    """[N, K] float32: w[k, n] = (q - z[k // g]) * s[k // g]."""
    rows = torch.arange(codes.shape[0]) // group
    return ((codes - zeros[rows]).float() * scales[rows].float()).t()


def pack_words(values, order):
    """[..., 8 m] codes -> [..., m] int32 words; nibble i holds column order[i] of each eight."""
    v = values.reshape(*values.shape[:-1], -1, 8).to(torch.int64)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, column in enumerate(order):
        word |= v[..., column] << (4 * i)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def awq_tensors(codes, zeros, scales):
    return dict(qweight=pack_words(codes, AWQ_ORDER), qzeros=pack_words(zeros, AWQ_ORDER), scales=scales)


def gptq_tensors(codes, zeros, scales, group, v1=True):
    k = codes.shape[0]
    qweight = pack_words(codes.t(), range(8)).t().contiguous()  # eight consecutive input rows a word
    stored = (zeros - 1) & 0xF if v1 else zeros
    return dict(qweight=qweight, qzeros=pack_words(stored, range(8)), scales=scales,
                g_idx=torch.arange(k, dtype=torch.int32) // group)


@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_v2"])
def test_unpacking_matches_the_format(method):
    n, k, group = 24, 64, 32
    codes, zeros, scales = random_codes(n, k, group)
    if method == "awq":
        stored, spec = awq_tensors(codes, zeros, scales), CheckpointQuantization("awq", group)
    else:
        stored = gptq_tensors(codes, zeros, scales, group, v1=method == "gptq")
        spec = CheckpointQuantization("gptq", group, zeros_minus_one=method == "gptq")
    tensors = [stored["qweight"], stored["qzeros"], stored["scales"], stored.get("g_idx")]
    qw = unpack(spec, "layer.weight", tensors, n, k)
    torch.testing.assert_close(dequantize(qw, torch.float32), expected_weight(codes, zeros, scales, group))


def write_quantized(model_dir, target_dir, method, group=16):
    """The tiny llama at model_dir saved as an AWQ / GPTQ checkpoint at target_dir: each projection
    round-to-nearest quantized (asymmetric, groups along K), packed in the format."""
    import shutil

    shutil.copytree(model_dir, target_dir)
    weights = load_file(str(target_dir / "model.safetensors"))
    out = {}
    for name, tensor in weights.items():
        if name.split(".")[-2] not in PROJECTIONS:
            out[name] = tensor
            continue
        w = tensor.float().t()  # [K, N]
        k, n = w.shape
        grouped = w.reshape(k // group, group, n)
        low, high = grouped.amin(1), grouped.amax(1)
        scales = ((high - low) / 15).clamp(min=1e-8).half()
        zeros = torch.round(-low / scales.float()).clamp(0, 15).long()
        codes = torch.round(grouped / scales.float()[:, None] + zeros[:, None]).clamp(0, 15).long().reshape(k, n)
        prefix = name.removesuffix(".weight")
        packed = awq_tensors(codes, zeros, scales) if method == "awq" else gptq_tensors(codes, zeros, scales, group)
        out.update({f"{prefix}.{key}": value for key, value in packed.items()})
        weights[name] = expected_weight(codes, zeros, scales, group)  # what the reference runs
    save_file(out, str(target_dir / "model.safetensors"))
    config = json.loads((target_dir / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"} if method == "awq" else
                                     {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                      "sym": False})
    (target_dir / "config.json").write_text(json.dumps(config))
    return {name: w for name, w in weights.items() if name.split(".")[-2] in PROJECTIONS}


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_quantized_checkpoint_generates_transformers_tokens(tiny_models, tmp_path, method):
    import copy

    model_dir, model = tiny_models["llama"]
    dequantized = write_quantized(model_dir, tmp_path / method, method)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in dequantized:
                param.copy_(dequantized[name])
    runtime = LLMInferenceRuntime(tmp_path / method, device="cpu", cuda_graphs=False)
    assert (runtime.config.quantization, runtime.config.quant_method) == ("int4", method)
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                           max_generate_length=12, temperature=0))
    assert_rows_match_transformers(response, reference, PROMPTS, 12)
    with pytest.raises(ConfigurationError, match=f"already {method} int4"):
        LLMInferenceRuntime(tmp_path / method, device="cpu", quantization="int8")


def test_bad_quantized_checkpoints(tiny_models, tmp_path):
    for spec, message in (({"quant_method": "bitsandbytes"}, "unsupported quant_method 'bitsandbytes'"),
                          ({"quant_method": "gptq", "bits": 8}, "8 bits are not supported"),
                          ({"quant_method": "gptq", "bits": 4, "desc_act": True}, "desc_act=true"),
                          ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
                          ({"quant_method": "edgellm", "kind": "int4"}, "layout None, not this version's")):
        with pytest.raises(UnsupportedModelError, match=message):
            checkpoint_quantization({"quantization_config": spec})
    target = tmp_path / "awq"
    write_quantized(tiny_models["llama"][0], target, "awq")
    weights = load_file(str(target / "model.safetensors"))
    name = next(n for n in weights if n.endswith("q_proj.scales"))
    weights[name] = weights[name][:1]
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=f"tensor {name} has shape"):
        LLMInferenceRuntime(target, device="cpu")
