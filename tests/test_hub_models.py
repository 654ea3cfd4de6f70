"""Models named by hub id ("org/name"): resolved from a hub-cache layout built here, offline; a local
directory of the same name wins; a missing id is a clear ModelLoadError."""

import shutil

import pytest

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import ModelLoadError
from edgellm.models import resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo: str, source):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/files}."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, entry / "snapshots" / COMMIT)
    return entry / "snapshots" / COMMIT


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_hub_id_resolves_from_the_cache_offline(tiny_models, offline_hub):
    source = tiny_models["llama"][0]
    snapshot = fake_hub_cache(offline_hub, "tiny-org/tiny-llama", source)
    assert resolve_model_dir("tiny-org/tiny-llama") == snapshot
    assert resolve_model_dir("tiny-org/tiny-llama@main") == snapshot
    request = LLMGenerationRequest(requests=[{"prompt": "w5 w6 w7"}], max_generate_length=4, temperature=0)
    by_id = LLMInferenceRuntime("tiny-org/tiny-llama", device="cpu", cuda_graphs=False).handle_request(request)
    local = LLMInferenceRuntime(source, device="cpu", cuda_graphs=False).handle_request(request)
    assert by_id.output_ids == local.output_ids


def test_a_local_directory_wins_and_a_missing_id_is_a_clear_error(tiny_models, offline_hub, tmp_path, monkeypatch):
    fake_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_models["llama"][0])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["qwen2"][0], tmp_path / "tiny-org" / "tiny-llama")
    assert resolve_model_dir("tiny-org/tiny-llama").resolve() == (tmp_path / "tiny-org" / "tiny-llama").resolve()
    with pytest.raises(ModelLoadError, match="not in the hub cache .* HF_HUB_OFFLINE is set"):
        LLMInferenceRuntime("tiny-org/missing-model", device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("./no/such/dir")
