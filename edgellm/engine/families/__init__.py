"""Model families, one small file each, saying how a family differs from the llama layout; the one
forward (engine/model.py) reads the differences as EngineConfig switches.

A family module has:
  MODEL_TYPES           the config.json model_type values it reads
  describe(hf)          (config.json in the llama family's keys, {EngineConfig field: value} it sets:
                        norm kind, activation, positions, attention options, sliding windows, ...)
  expected_shapes(cfg)  every checkpoint tensor it reads, by name, with the shape the config implies
  load(cfg, tensors)    ModelWeights from a weights.Tensors source (names, fusing, transposes)

Adding a family: a file with those four, listed in FAMILIES below; if it needs a difference the
forward does not have yet, a switch in EngineConfig read by model.py (not a copy of the forward).
"""

from __future__ import annotations

from types import ModuleType

from ...errors import UnsupportedModelError
from . import gemma3, gpt2, llama, phi3

FAMILIES: dict[str, ModuleType] = {kind: module for module in (llama, phi3, gpt2, gemma3) for kind in module.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str | None, architectures=None) -> ModuleType:
    if model_type not in FAMILIES:
        arch = ", ".join(architectures or []) or "unknown"
        raise UnsupportedModelError(f"unsupported architecture: model_type={model_type!r} ({arch}); "
                                    f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]
