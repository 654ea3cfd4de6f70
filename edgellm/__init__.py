"""edgellm: a pure-Python, Triton-kernel-centric LLM inference runtime.

    from edgellm import LLMInferenceRuntime, LLMGenerationRequest
    runtime = LLMInferenceRuntime()            # the embedded default model
    response = runtime.handle_request(LLMGenerationRequest(
        requests=[{"messages": [{"role": "user", "content": "What is the capital of France?"}]}],
        temperature=0))
    print(response.output_texts[0])
"""

from . import errors
from .engine import EngineConfig, LinearKVCache, LLMEngineRunner
from .engine.kv_store import KVReuseSettings, KVReuseStats
from .speculative import SpeculativeConfig, SpeculativeStats
from .models import default_model_dir
from .requests import GenerationItem, GenerationTimings, LLMGenerationRequest, LLMGenerationResponse
from .runtime import LLMInferenceRuntime

__version__ = "0.1.0"

__all__ = [
    "EngineConfig", "GenerationItem", "GenerationTimings", "KVReuseSettings", "KVReuseStats", "LinearKVCache",
    "LLMEngineRunner",
    "LLMGenerationRequest", "LLMGenerationResponse", "LLMInferenceRuntime", "SpeculativeConfig", "SpeculativeStats",
    "default_model_dir", "errors",
]
