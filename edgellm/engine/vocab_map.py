"""Reduced-vocabulary maps on disk: `vocab_map.safetensors` holds one int32 tensor `vocab_map`,
reduced id -> full id, strictly ascending; `reduced_vocab.json` beside it says how it was made.

The engine gathers its LM head rows by the map at load (prefill and decode compute logits over the
reduced vocabulary only) and remaps sampled ids back to full ids; this file only reads, checks and
writes the map, so both the engine and the `edgellm reduce-vocab` tool (edgellm/vocab/) use it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import VocabMapError

MAP_FILE = "vocab_map.safetensors"
INFO_FILE = "reduced_vocab.json"
TENSOR = "vocab_map"


def check_vocab_map(ids: torch.Tensor, vocab_size: int, required=(), where: str = "vocab map") -> torch.Tensor:
    """ids as an int32 CPU tensor, after checking it is a usable map of a vocab_size vocabulary that
    keeps every id in `required` (EOS at least)."""
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise VocabMapError(f"{where}: `{TENSOR}` must be a non-empty 1-D integer tensor, "
                            f"got {tuple(ids.shape)} {ids.dtype}")
    ids = ids.to(torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise VocabMapError(f"{where}: ids must lie in [0, {vocab_size}) for this model's vocabulary of "
                            f"{vocab_size}, found {low if low < 0 else high} (a map made for another model?)")
    steps = ids[1:] - ids[:-1]
    if bool((steps == 0).any()):
        raise VocabMapError(f"{where}: id {int(ids[1:][steps == 0][0])} appears more than once")
    if bool((steps < 0).any()):
        raise VocabMapError(f"{where}: ids must be in ascending order (at position {int((steps < 0).nonzero()[0]) + 1})")
    if ids.numel() > vocab_size:
        raise VocabMapError(f"{where}: {ids.numel()} ids for a vocabulary of {vocab_size}")
    kept = set(ids.tolist())
    missing = sorted(i for i in required if i not in kept)
    if missing:
        raise VocabMapError(f"{where}: required token ids missing from the map: {missing[:8]} "
                            f"(EOS and the other stop tokens must be kept)")
    return ids.to(torch.int32)


def map_path(location: str | Path) -> Path:
    """The map file of a directory (or the file itself)."""
    location = Path(location)
    return location / MAP_FILE if location.is_dir() else location


def load_vocab_map(location: str | Path, vocab_size: int, required=()) -> torch.Tensor:
    """The checked map (int32, CPU) from a directory holding vocab_map.safetensors, or the file."""
    from safetensors import safe_open

    path = map_path(location)
    if not path.is_file():
        raise VocabMapError(f"no {MAP_FILE} at {location}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if TENSOR not in f.keys():
                raise VocabMapError(f"{path} has no tensor named `{TENSOR}` (found {', '.join(f.keys()) or 'none'})")
            ids = f.get_tensor(TENSOR)
    except VocabMapError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise VocabMapError(f"cannot read {path}: {exc}") from exc
    return check_vocab_map(ids, vocab_size, required, where=str(path))


def save_vocab_map(directory: str | Path, ids: torch.Tensor, info: dict) -> Path:
    """Write vocab_map.safetensors and reduced_vocab.json into `directory` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({TENSOR: ids.to(torch.int32).contiguous()}, str(directory / MAP_FILE))
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return directory / MAP_FILE
