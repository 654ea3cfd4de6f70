"""`edgellm export` and the onnxruntime backend (CPU here): the exported graph against the triton
path (fp32, greedy, logits), its I/O description against the graph, binding without copies, and
the errors of bad exports and backends."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("onnx", reason="the export tests need edgellm[onnx] (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the export tests need edgellm[onnx] (onnx, onnxscript, onnxruntime)")

from edgellm import LLMEngineRunner  # noqa: E402
from edgellm.errors import (BackendError, ConfigurationError, ExportError, InvalidRequestError, LoraError,  # noqa: E402
                            ModelLoadError, UnsupportedModelError)
from edgellm.export import export_onnx  # noqa: E402

from conftest import build_model  # noqa: E402

LIMITS = dict(max_batch_size=3, max_input_length=24, max_kv_cache_capacity=48)
EXPORTED = ("llama", "qwen3", "qwen2", "mistral_window")


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    """family -> (model_dir, export_dir). mistral_window: a 5-token sliding window, inside the cache."""
    built = {}
    for family in EXPORTED:
        if family == "mistral_window":
            model_dir = tmp_path_factory.mktemp("mistral_window")
            build_model("mistral", model_dir, sliding_window=5)
        else:
            model_dir = tiny_models[family][0]
        out = tmp_path_factory.mktemp(f"{family}_onnx")
        export_onnx(model_dir, out, progress=lambda _: None, **LIMITS)
        built[family] = (model_dir, out)
    return built


def test_exported_graph_passes_the_full_checker_and_its_json_describes_it(exports):
    import onnx

    for family, (model_dir, out) in exports.items():
        onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
        described = json.loads((out / "edgellm_engine.json").read_text())
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT32: "int32"}
        for values, wanted in ((graph.input, described["inputs"]), (graph.output, described["outputs"])):
            seen = [dict(name=v.name, dtype=types[v.type.tensor_type.elem_type],
                         shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
            assert seen == wanted, family
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        assert [i["name"] for i in described["inputs"]] == ["inputs_embeds", "past_lengths", "context_lengths", "slots",
                                                            "kv_positions"] + [f"past_key_values.{i}" for i in range(layers)]
        assert described["limits"] == LIMITS and described["opset"] == 18 and described["dtype"] == "float32"
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "embedding.safetensors"):
            assert (out / name).is_file(), name


@pytest.mark.parametrize("family", EXPORTED)
def test_onnxruntime_greedy_is_token_identical_to_triton_and_binds_without_copies(exports, family):
    model_dir, out = exports[family]
    triton = LLMEngineRunner(model_dir, device="cpu", dtype="float32", **LIMITS)
    ort = LLMEngineRunner(out, backend="onnxruntime", device="cpu")
    assert ort.backend == "onnxruntime" and type(ort) is LLMEngineRunner
    assert ort.config.max_supported_batch_size == 3 and ort.config.max_kv_cache_capacity == 48  # the export's
    prompts = [[1, 5, 7, 9, 11, 13, 4, 8, 30], [1, 20, 21]]  # right-padded: the short row's pads must not matter
    slots = [2, 0]
    cache_ptr, logits_ptr = ort.kv_cache.data.data_ptr(), ort.logits.data_ptr()
    with torch.inference_mode():
        want, got = triton.prefill_tokens(prompts, slots=slots), ort.prefill_tokens(prompts, slots=slots)
        assert got.data_ptr() == logits_ptr  # the logits are the runner's buffer, written by onnxruntime
        tokens_t, tokens_o = [], []
        for _ in range(16):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            a, b = want.argmax(-1), got.argmax(-1)
            tokens_t.append(a.tolist())
            tokens_o.append(b.tolist())
            want = triton.decode_step(triton.embed(a[:, None]), slots=slots)
            got = ort.decode_step(ort.embed(b[:, None]), slots=slots)
    assert tokens_o == tokens_t
    assert len({tuple(t) for t in tokens_t}) > 1  # the greedy path is not one repeated token
    # No copies per step: onnxruntime read and wrote the runner's own buffers, the cache in place.
    assert (ort.kv_cache.data.data_ptr(), ort.logits.data_ptr()) == (cache_ptr, logits_ptr)
    for layer in range(ort.config.num_decoder_layers):
        ptr = ort.kv_cache.data[layer].data_ptr()
        assert ort.engine.bound[f"past_key_values.{layer}"] == ort.engine.bound[f"present_key_values.{layer}"] == ptr
    assert ort.engine.bound["logits"] == logits_ptr
    rows = torch.tensor(slots)
    torch.testing.assert_close(ort.kv_cache.lengths, triton.kv_cache.lengths)
    for slot, n in zip(slots, ort.kv_cache.lengths[rows].tolist()):
        torch.testing.assert_close(ort.kv_cache.data[:, :, slot, :, :n], triton.kv_cache.data[:, :, slot, :, :n],
                                   atol=1e-5, rtol=0)


def test_onnxruntime_prefill_after_a_cached_prefix_matches_triton(exports):
    model_dir, out = exports["llama"]
    triton = LLMEngineRunner(model_dir, device="cpu", dtype="float32", **LIMITS)
    ort = LLMEngineRunner(out, backend="onnxruntime", device="cpu")
    prompt = [1, 5, 7, 9, 11, 13, 4, 8]
    for runner in (triton, ort):
        runner.prefill_tokens([prompt[:3]], slots=[1])
    want = triton.prefill_tokens([prompt], slots=[1], cached_lengths=[3])
    got = ort.prefill_tokens([prompt], slots=[1], cached_lengths=[3])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not got.data_ptr() == ort.logits.data_ptr()  # outside inference mode: the caller's own copy


def test_export_refuses_unsupported_families_and_occupied_directories(tiny_models, exports, tmp_path):
    from family_models import build_gpt2  # a family the export does not take

    gpt2 = tmp_path / "gpt2"
    build_gpt2(gpt2, tie=True)
    with pytest.raises(UnsupportedModelError, match="export supports model types llama, mistral, qwen2, qwen3"):
        export_onnx(gpt2, tmp_path / "gpt2_onnx", progress=lambda _: None)
    assert not (tmp_path / "gpt2_onnx").exists()  # refused before anything was written
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_onnx(tiny_models["llama"][0], busy, progress=lambda _: None)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(tiny_models["llama"][0], tmp_path / "x", dtype="int8", progress=lambda _: None)


def test_backend_errors_are_clear_and_leave_the_runner_usable(exports, tmp_path, monkeypatch):
    model_dir, out = exports["llama"]
    with pytest.raises(BackendError, match="unknown backend 'onnx'; choose one of triton, onnxruntime$"):
        LLMEngineRunner(out, backend="onnx")
    with pytest.raises(BackendError, match="TensorRT engine is a trial outside the package"):
        LLMEngineRunner(out, backend="tensorrt")
    with pytest.raises(ModelLoadError, match="not an edgellm export"):
        LLMEngineRunner(model_dir, backend="onnxruntime", device="cpu")
    with pytest.raises(BackendError, match="max_batch_size=8 exceeds the 3 this export's engine is built for"):
        LLMEngineRunner(out, backend="onnxruntime", device="cpu", max_batch_size=8)
    with pytest.raises(BackendError, match="graph is float32"):
        LLMEngineRunner(out, backend="onnxruntime", device="cpu", dtype="float16")
    with pytest.raises(ConfigurationError, match="max_lora_rank is not supported by the onnxruntime backend"):
        LLMEngineRunner(out, backend="onnxruntime", device="cpu", max_lora_rank=8)
    with monkeypatch.context() as patch:  # onnxruntime not installed: the import fails
        patch.setitem(sys.modules, "onnxruntime", None)
        with pytest.raises(BackendError, match="needs the onnxruntime package"):
            LLMEngineRunner(out, backend="onnxruntime", device="cpu")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(out, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ModelLoadError, match="num_decoder_layers: graph 2, config 1"):
        LLMEngineRunner(mismatched, backend="onnxruntime", device="cpu")

    ort = LLMEngineRunner(out, backend="onnxruntime", device="cpu")
    prompt = [[1, 5, 7, 9]]
    first = ort.prefill_tokens(prompt)
    with pytest.raises(InvalidRequestError, match="prefilled slots"):
        ort.decode_step(ort.embed(torch.tensor([[3]])), slots=[2])  # slot 2 holds nothing
    with pytest.raises(InvalidRequestError, match="context lengths must be in"):
        ort.prefill_tokens([list(range(1, 30))])
    with pytest.raises(LoraError, match="base model only"):
        ort.prefill_tokens(prompt, lora=["style"])
    with pytest.raises(ConfigurationError, match="attach_block_pools is a triton-backend feature"):
        ort.attach_block_pools(None, None)
    torch.testing.assert_close(ort.prefill_tokens(prompt), first)  # same answer after the errors


def test_cli_export_then_bench_backends_side_by_side(tiny_models, tmp_path, capsys):
    from edgellm.cli import main

    llama = tiny_models["llama"][0]
    assert main(["export", str(llama), "--output", str(tmp_path / "onnx"), "--max-batch-size", "2"]) == 0
    assert "backend='onnxruntime'" in capsys.readouterr().out
    assert json.loads((tmp_path / "onnx" / "edgellm_engine.json").read_text())["limits"]["max_batch_size"] == 2
    assert main(["export", str(llama), "--output", str(tmp_path / "onnx")]) == 2  # not empty: a clear error
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["bench", "--backend", "triton", "onnxruntime", "--model-dir", str(llama), "--device", "cpu",
                 "--isl", "5", "--osl", "6", "--iterations", "1", "--batch", "2", "--cache-dir", str(tmp_path / "c"),
                 "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["triton", "onnxruntime"]
    assert rows[1]["same_as_triton"] == "7/7" and rows[1]["tokens"] == rows[0]["tokens"]
    assert "same tokens as triton" in capsys.readouterr().out


def _ort_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_an_export_runs_in_the_runtime_and_from_the_command_line(exports, capsys):
    """LLMInferenceRuntime and `edgellm generate -m EXPORT` run the graph on onnxruntime: the same
    tokens as the checkpoint's triton path, sampled ones too (same seed, same draws); `info` says what it
    is; the triton backend and KV reuse refuse an export with what to do instead."""
    from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime
    from edgellm.cli import main

    model_dir, out = exports["qwen3"]
    request = LLMGenerationRequest(requests=[{"input_ids": [1, 5, 7, 9]}, {"prompt": "w3 w4"}],
                                   max_generate_length=8, temperature=0.8, top_k=20, seed=3)
    exported = LLMInferenceRuntime(out, device="cpu", **LIMITS)
    assert exported.runner.backend == "onnxruntime"
    got = exported.handle_request(request)
    want = LLMInferenceRuntime(model_dir, device="cpu", **LIMITS).handle_request(request)
    assert got.output_ids == want.output_ids and got.finish_reasons == want.finish_reasons
    assert main(["generate", "w3 w4", "-m", str(out), "-n", "5", "--raw", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == LLMInferenceRuntime(model_dir, device="cpu", **LIMITS).handle_request(
        LLMGenerationRequest(requests=[{"prompt": "w3 w4"}], max_generate_length=5, temperature=0)).output_texts[0]
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "an ONNX graph from `edgellm export`" in info and "max_kv_cache_capacity        48" in info
    with pytest.raises(ModelLoadError, match="backend='onnxruntime'"):
        LLMEngineRunner(out, device="cpu")
    with pytest.raises(ConfigurationError, match="KV reuse needs the triton backend"):
        LLMInferenceRuntime(out, device="cpu", kv_reuse=KVReuseSettings())


@pytest.mark.gpu
def test_onnxruntime_without_its_cuda_provider_refuses_cuda_tensors(exports):
    if _ort_cuda():
        pytest.skip("this onnxruntime has the CUDA execution provider (onnxruntime-gpu)")
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        LLMEngineRunner(exports["llama"][1], backend="onnxruntime", device="cuda")


@pytest.mark.gpu
def test_onnxruntime_on_cuda_tensors_matches_triton(exports):
    if not _ort_cuda():
        pytest.skip("onnxruntime here has no CUDA execution provider (onnxruntime-gpu is not installed)")
    model_dir, out = exports["llama"]
    triton = LLMEngineRunner(model_dir, device="cuda", dtype="float32", **LIMITS)
    ort = LLMEngineRunner(out, backend="onnxruntime", device="cuda")
    prompts, slots = [[1, 5, 7, 9, 11, 13], [1, 20, 21]], [1, 0]
    with torch.inference_mode():
        want, got = triton.prefill_tokens(prompts, slots=slots), ort.prefill_tokens(prompts, slots=slots)
        for _ in range(16):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            token = want.argmax(-1)
            want = triton.decode_step(triton.embed(token[:, None]), slots=slots)
            got = ort.decode_step(ort.embed(token[:, None]), slots=slots)
    assert ort.engine.bound["present_key_values.0"] == ort.kv_cache.data[0].data_ptr()
