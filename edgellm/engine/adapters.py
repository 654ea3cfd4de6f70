"""The LoRA adapters of one engine: names -> stack slots (the stacks themselves: engine/lora.py), the
active adapter (used where a call names none), and a batch's per-row slots as the steps read them.
The runner's LoRA methods and every step go through one Adapters object."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigurationError, InvalidRequestError, LoraError
from ..kernels.lora import UNROLL, used_slots
from .config import EngineConfig
from .lora import LoraAdapter, LoraStacks, read_adapter
from .model import LoraBatch


def read_adapter_spec(cfg: EngineConfig, name, spec) -> LoraAdapter:
    """An adapter given as a path (PEFT directory or bare .safetensors) or {"path", "rank", "alpha"}."""
    if cfg.mlp != "gated":
        raise LoraError("LoRA adapters are supported for models with a gated MLP (llama, mistral, qwen2, qwen3, "
                        f"phi3, gemma3_text); this model is {cfg.model_type}")
    if not isinstance(name, str) or not name:
        raise LoraError(f"a LoRA adapter name must be a non-empty string, got {name!r}")
    if isinstance(spec, dict):
        unknown = set(spec) - {"path", "rank", "alpha"}
        if "path" not in spec or unknown:
            raise LoraError(f"LoRA adapter {name!r}: give a path, or a dict with 'path' and optional 'rank' / 'alpha'")
        return read_adapter(spec["path"], cfg, rank=spec.get("rank"), alpha=spec.get("alpha"))
    if not isinstance(spec, (str, Path)):
        raise LoraError(f"LoRA adapter {name!r}: expected a path, got {type(spec).__name__}")
    return read_adapter(spec, cfg)


def lora_limits(adapters: dict, max_lora_rank, max_loras) -> int:
    """The engine's max_lora_rank (default: the largest given adapter's), the limits checked."""
    for value, what in ((max_lora_rank, "max_lora_rank"), (max_loras, "max_loras")):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigurationError(f"{what} must be a non-negative integer, got {value!r}")
    if max_loras is not None and max_loras < max(1, len(adapters)):
        raise ConfigurationError(f"max_loras={max_loras} cannot hold the {len(adapters)} adapters given")
    rank = max((a.rank for a in adapters.values()), default=0) if max_lora_rank is None else max_lora_rank
    too_big = [n for n, a in adapters.items() if a.rank > rank]
    if too_big:
        raise LoraError(f"LoRA adapter {too_big[0]!r} has rank {adapters[too_big[0]].rank}, above max_lora_rank {rank}")
    return rank


class Adapters:
    def __init__(self, cfg: EngineConfig, stacks: LoraStacks | None, device: torch.device):
        self.cfg, self.stacks, self.device = cfg, stacks, device
        self.active = ""  # the adapter of rows whose call names none ("" = the base model)
        # Entries of a used-slot list (kernels/lora.py used_slots) for this engine.
        self.capacity = max(stacks.max_loras if stacks is not None else 0, UNROLL)

    def add(self, name: str, path, rank: int | None = None, alpha: float | None = None) -> None:
        """Checked in full before anything is written."""
        if self.stacks is None:
            raise LoraError("this engine was built without LoRA support: pass max_lora_rank=N (or lora_weights) "
                            "when building it")
        if isinstance(name, str) and name in self.stacks.slots:
            raise LoraError(f"a LoRA adapter named {name!r} is already loaded; remove it first")
        self.stacks.add(name, read_adapter_spec(self.cfg, name, {"path": path, "rank": rank, "alpha": alpha}))

    def remove(self, name: str) -> None:
        self.stacks.remove(name)
        if self.active == name:
            self.active = ""

    def switch(self, name: str) -> None:
        self.slot(name)  # raises for an unknown name
        self.active = name

    def names(self) -> list[str]:
        return sorted(self.stacks.slots) if self.stacks is not None else []

    def slot(self, name: str | None) -> int:
        """The stack slot of adapter `name` (None: the active adapter; "": -1, the base model)."""
        name = self.active if name is None else name
        if not isinstance(name, str):
            raise LoraError(f"a LoRA adapter name must be a string, got {name!r}")
        if name == "":
            return -1
        if self.stacks is None or name not in self.stacks.slots:
            available = ", ".join(self.names()) or "none loaded"
            raise LoraError(f"unknown LoRA adapter {name!r} (available: {available}; '' is the base model)")
        return self.stacks.slots[name]

    def fingerprint(self, name: str | None) -> str:
        """What names adapter `name`'s weights ("" for the base model): its name and a digest of its
        content, so a saved KV prefix is never reused under another adapter of the same name."""
        if self.slot(name) < 0:
            return ""
        name = self.active if name is None else name
        return f"{name}:{self.stacks.fingerprints[name]}"

    def rows(self, lora, batch: int) -> list[int]:
        """Per-row adapter slots from `lora`: None (the active adapter for every row) or one name per row."""
        if lora is None or isinstance(lora, str):
            return [self.slot(lora)] * batch
        names = list(lora)
        if len(names) != batch:
            raise InvalidRequestError(f"lora: {len(names)} adapter names for {batch} rows")
        return [self.slot(n) for n in names]

    def batch(self, index: torch.Tensor, used: torch.Tensor, uses_lora: bool) -> LoraBatch | None:
        """What forward_logits takes: the rows' slots `index` and used-slot list, or None without adapters."""
        return LoraBatch(self.stacks, index, used) if uses_lora else None

    def batch_of(self, lora_rows: list[int]) -> LoraBatch | None:
        """batch() for per-row slots known on the host (the eager steps)."""
        index = torch.tensor(lora_rows, dtype=torch.int32, device=self.device)
        return self.batch(index, used_slots(lora_rows, self.capacity, self.device), any_adapter(lora_rows))


def any_adapter(lora_slots: list[int]) -> bool:
    """Whether any row of these LoRA slots (-1: none) uses an adapter."""
    return max(lora_slots, default=-1) >= 0
