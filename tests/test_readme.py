"""The README's Python examples, run as written on tiny models: each ```python block in order, in one
namespace, in a scratch directory holding the files they name (adapters, images, a reduced vocabulary).
Only what a tiny CPU run needs changes: model paths become tiny models, sizes fit them (SUBSTITUTIONS)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime

pytestmark = pytest.mark.reference_ops  # the examples' subject is the API (conftest.py)

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def substitutions(model: Path, vlm: Path, kv_dir: Path) -> dict[str, str]:
    """README text -> what a tiny CPU run uses instead."""
    return {
        "LLMInferenceRuntime()": f"LLMInferenceRuntime({str(model)!r})",
        "LLMInferenceRuntime(speculative=": f"LLMInferenceRuntime({str(model)!r}, speculative=",
        '"path/to/hf-model"': repr(str(model)), '"path/to/model"': repr(str(model)),
        '"path/to/small-model"': repr(str(model)), '"org/model"': repr(str(model)),
        '"Qwen2.5-VL-3B-Instruct"': repr(str(vlm)),
        "[1, 504, 3575]": "[1, 50, 35]",  # ids of the tiny vocabulary
        "gpu_bytes=512 << 20": "gpu_bytes=8 << 20", "host_bytes=4 << 30": "host_bytes=8 << 20",
        '"~/.cache/kv"': repr(str(kv_dir)),
    }


def test_every_python_example_of_the_readme_runs(tiny_models, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openai")  # (the Serve section's client talks to a test server)
    from http_server import running_server
    from conftest import random_adapters
    from vlm_models import build_vlm, random_image

    from edgellm.engine.vocab_map import save_vocab_map

    model = tiny_models["llama"][0]
    build_vlm("qwen2_5_vl", tmp_path / "vlm")
    monkeypatch.chdir(tmp_path)
    adapters = random_adapters(model, tmp_path / "made")
    shutil.copytree(adapters["a"], tmp_path / "adapters" / "medical")
    shutil.copytree(adapters["a"], tmp_path / "adapters" / "legal")
    shutil.copy(adapters["a"] / "adapter_model.safetensors", tmp_path / "adapters" / "chat.safetensors")
    for name in ("photo.jpg", "a.png", "b.png"):
        random_image(40, 40).save(name)
    save_vocab_map("reduced", torch.arange(80), {"method": "test"})
    namespace = {"model_dir": model,
                 "request": LLMGenerationRequest(requests=[{"prompt": "w1 w2 w3"}], max_generate_length=4)}
    blocks = python_blocks()
    assert len(blocks) >= 8
    with running_server(LLMInferenceRuntime(model, device="cpu", max_batch_size=2)) as (url, state):
        served = {'"http://127.0.0.1:8000/v1"': repr(url + "/v1"),  # (the Serve section's client)
                  '"SmolLM2-135M-Instruct"': repr(state.settings.model_name)}
        for number, block in enumerate(blocks, 1):
            for old, new in {**substitutions(model, tmp_path / "vlm", tmp_path / "kv"), **served}.items():
                block = block.replace(old, new)
            try:
                exec(compile(block, f"README.md python block {number}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"README python block {number} failed:\n{block}") from exc
    assert namespace["response"].output_texts and (tmp_path / "model-onnx" / "model.onnx").is_file()
