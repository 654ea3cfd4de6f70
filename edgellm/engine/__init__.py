"""One model's execution: config, weights, decoder forward, KV cache, runner. Knows nothing of text."""

from .config import EngineConfig
from .kv_cache import LinearKVCache
from .runner import LLMEngineRunner

__all__ = ["EngineConfig", "LinearKVCache", "LLMEngineRunner"]
