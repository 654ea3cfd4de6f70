"""LoRA adapters: reading them (PEFT directories or bare safetensors files), and the registry that
keeps every loaded adapter in preallocated device stacks so that one batch can mix adapters.

The stacks are allocated once, when the engine is built, for `max_loras` adapters of rank up to
`max_lora_rank`. Adding, removing or switching an adapter only writes slots of those tensors or picks
a slot index: no tensor the CUDA graphs captured ever moves, so graphs stay valid across adapter
changes, and the KV cache and model weights are never touched.

Layout per layer, one entry per fused projection group (kernels/lora.py):
  qkv:     A [slots, 3R, hidden],  B [slots, q + 2 kv, R]     segments q, k, v
  o:       A [slots, R, q],        B [slots, hidden, R]
  gate_up: A [slots, 2R, hidden],  B [slots, 2 ffn, R]        segments gate, up
  down:    A [slots, R, ffn],      B [slots, hidden, R]
An adapter of rank r < R fills the first r rows of its A segments and columns of B; projections it
does not target stay zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LoraError, read_json
from .config import EngineConfig

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
DEFAULT_MAX_LORAS = 8

# ...layers.<i>.(self_attn|mlp).<m>_proj.lora_<A|B>[.<adapter name>].weight, PEFT's naming.
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def module_shapes(cfg: EngineConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection LoRA may target."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q": (cfg.q_size, h), "k": (cfg.kv_size, h), "v": (cfg.kv_size, h), "o": (h, cfg.q_size),
            "gate": (i, h), "up": (i, h), "down": (h, i)}


@dataclasses.dataclass
class LoraAdapter:
    """One adapter read from disk, on CPU: (layer, module) -> (A [r, in], B [out, r])."""

    path: Path
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def fingerprint(self) -> str:
        """A digest of the adapter's content (scaling and every A and B)."""
        digest = hashlib.sha256(f"{self.rank}:{self.scaling!r}".encode())
        for (layer, module), pair in sorted(self.weights.items()):
            digest.update(f"{layer}.{module}".encode())
            for tensor in pair:
                digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]


def _peft_config(directory: Path) -> tuple[int, float, bool]:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise LoraError(f"{directory} has no adapter_config.json (expected a PEFT LoRA adapter directory)")
    config = read_json(path, LoraError)
    if not isinstance(config, dict):
        raise LoraError(f"{path} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise LoraError(f"{path}: unsupported LoRA options {', '.join(unsupported)} (edgellm runs plain LoRA "
                        "on the q/k/v/o/gate/up/down projections)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise LoraError(f"{path}: needs an integer r >= 1 and a numeric lora_alpha, got r={rank!r}, "
                        f"lora_alpha={alpha!r}")
    return rank, float(alpha), bool(config.get("use_rslora", False))


def read_adapter(path: str | Path, cfg: EngineConfig, *, rank: int | None = None,
                 alpha: float | None = None) -> LoraAdapter:
    """Read and check an adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors)
    or a bare .safetensors file of lora_A / lora_B tensors, whose `alpha` the caller gives (its rank
    comes from the tensors; a given `rank` must agree). Raises LoraError on anything that does not fit."""
    path = Path(path)
    if path.is_dir():
        if rank is not None or alpha is not None:
            raise LoraError(f"{path}: rank and alpha come from adapter_config.json; do not pass them")
        rank, alpha, rslora = _peft_config(path)
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise LoraError(f"{path} has no adapter_model.safetensors (only safetensors adapters are supported)")
    elif path.is_file():
        if alpha is None:
            raise LoraError(f"{path}: a bare safetensors adapter needs its lora_alpha (alpha=...)")
        file, rslora = path, False
    else:
        raise LoraError(f"LoRA adapter {path} does not exist")
    tensors = _read_tensors(file)
    shapes = module_shapes(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise LoraError(f"{file}: tensor {key!r} is not a LoRA A/B matrix of a q/k/v/o/gate/up/down "
                            "projection (other targets are not supported)")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layer >= cfg.num_decoder_layers:
            raise LoraError(f"{file}: tensor {key!r} is for layer {layer}, the model has {cfg.num_decoder_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise LoraError(f"{file} holds no LoRA tensors")
    ranks = set()
    weights = {}
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{file}: layer {layer} {module}_proj has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        out_features, in_features = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features \
                or a.shape[0] != b.shape[1]:
            raise LoraError(f"{file}: layer {layer} {module}_proj has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                            f"this model needs A [r, {in_features}] and B [{out_features}, r]")
        ranks.add(a.shape[0])
        weights[(layer, module)] = (a, b)
    if len(ranks) != 1:
        raise LoraError(f"{file}: the projections have different ranks {sorted(ranks)} (one rank per adapter)")
    found = ranks.pop()
    if rank is not None and rank != found:
        raise LoraError(f"{file}: rank {rank} was given (or configured) but the tensors have rank {found}")
    scaling = float(alpha) / (math.sqrt(found) if rslora else found)
    return LoraAdapter(path=path, rank=found, scaling=scaling, weights=weights)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or corrupt files
        raise LoraError(f"cannot read LoRA weights from {file}: {exc}") from exc


def stack_rank(max_rank: int) -> int:
    """The rank the stacks are allocated with: tl.dot needs >= 16, and a power of two."""
    return max(16, 1 << (max_rank - 1).bit_length())


class LoraStacks:
    """The device stacks of every adapter slot, and the registry of names -> slots."""

    def __init__(self, cfg: EngineConfig, max_rank: int, max_loras: int, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        self.rank = stack_rank(max_rank)
        self.max_rank = max_rank
        self.max_loras = max_loras
        shapes = module_shapes(cfg)
        self.segments = {g: tuple(shapes[m][0] for m in members) for g, members in GROUPS.items()}
        self.layers = []
        for _ in range(cfg.num_decoder_layers):
            layer = {}
            for group, members in GROUPS.items():
                k = shapes[members[0]][1]
                layer[group] = (torch.zeros(max_loras, len(members) * self.rank, k, dtype=dtype, device=device),
                                torch.zeros(max_loras, sum(self.segments[group]), self.rank, dtype=dtype, device=device))
            self.layers.append(layer)
        self.scale = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self.slots: dict[str, int] = {}
        self.fingerprints: dict[str, str] = {}  # name -> LoraAdapter.fingerprint() (KV reuse keys)

    def add(self, name: str, adapter: LoraAdapter) -> int:
        if adapter.rank > self.max_rank:
            raise LoraError(f"LoRA adapter {name!r} has rank {adapter.rank}, above the engine's max_lora_rank "
                            f"{self.max_rank}; build the engine with max_lora_rank >= {adapter.rank}")
        free = [s for s in range(self.max_loras) if s not in self.slots.values()]
        if not free:
            raise LoraError(f"all {self.max_loras} LoRA slots are in use ({', '.join(self.slots)}); remove one "
                            "first or build the engine with a larger max_loras")
        slot = free[0]
        self._write(slot, adapter)
        self.slots[name] = slot
        self.fingerprints[name] = adapter.fingerprint()
        return slot

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        shapes = module_shapes(self.cfg)
        for layer_index, layer in enumerate(self.layers):
            for group, (a_stack, b_stack) in layer.items():
                a_stack[slot].zero_()
                b_stack[slot].zero_()
                start = 0
                for position, module in enumerate(GROUPS[group]):
                    out_features = shapes[module][0]
                    pair = adapter.weights.get((layer_index, module))
                    if pair is not None:
                        a, b = pair
                        r = a.shape[0]
                        a_stack[slot, position * self.rank:position * self.rank + r].copy_(a)
                        b_stack[slot, start:start + out_features, :r].copy_(b)
                    start += out_features
        self.scale[slot] = adapter.scaling

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        self.fingerprints.pop(name, None)
        self.scale[slot] = 0.0
