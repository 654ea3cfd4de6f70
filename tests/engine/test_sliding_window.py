"""Sliding-window attention in the llama-layout families against transformers in float32, with
windows shorter than the prompts: mistral (every layer), qwen2 with use_sliding_window (the layers
from max_window_layers on) and phi3; the window no longer bounds the cache. (Gemma 3:
tests/engine/families/test_gemma3.py.)"""

import pytest

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.config import EngineConfig

from conftest import assert_rows_match_transformers, build_model
from family_models import build_phi3

PROMPTS = [list(range(10, 21)), [5, 9, 13, 7, 30, 31, 32], [40, 41, 42]]


@pytest.mark.parametrize("family,overrides,windows", [
    ("mistral", dict(sliding_window=5), (5, 5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), (0, 4)),
    ("phi3", dict(sliding_window=6), (6, 6)),
])
def test_greedy_tokens_match_transformers(tmp_path, family, overrides, windows):
    model = build_phi3(tmp_path, **overrides) if family == "phi3" else build_model(family, tmp_path, **overrides)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False)
    assert runtime.config.layer_windows == windows
    assert runtime.config.max_kv_cache_capacity > max(windows)  # the window no longer caps the cache
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                           max_generate_length=24, temperature=0))
    assert_rows_match_transformers(response, model, PROMPTS, 24)


def test_qwen_windows_only_with_use_sliding_window(tiny_models):
    config = EngineConfig.from_model_dir(tiny_models["qwen2"][0])
    assert config.layer_windows == ()  # transformers saves sliding_window with use_sliding_window=false
