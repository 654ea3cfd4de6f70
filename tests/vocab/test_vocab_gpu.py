"""A reduced vocabulary on a CUDA GPU (bench/gpu_check.sh): CUDA-graph decode with the reduced LM
head and the remap kernel gives eager's tokens, and the full vocabulary's where the map keeps the full
argmax path; no reference op runs. Skipped without a GPU."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.vocab_map import save_vocab_map
from edgellm.kernels import forbid_reference_on_cuda

from conftest import build_model

pytestmark = pytest.mark.gpu

ITEMS = [{"prompt": "w5 w6 w7"}, {"prompt": "w10 w11 w12 w13"}, {"prompt": "w20 w21 w20 w21"}]


def run(runtime):
    return runtime.handle_request(LLMGenerationRequest(requests=ITEMS, max_generate_length=12, temperature=0)).output_ids


def test_reduced_vocabulary_graphs_match_eager_and_the_full_vocabulary(tmp_path):
    model_dir = tmp_path / "llama"
    build_model("llama", model_dir)
    full = run(LLMInferenceRuntime(model_dir, device="cuda", dtype="float16"))
    keep = {0, 1, 2, 3, 4, 5} | {t for ids in full for t in ids} | set(range(40, 60))
    save_vocab_map(tmp_path / "map", torch.tensor(sorted(keep)), {})
    graphs = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", reduced_vocab_dir=tmp_path / "map")
    eager = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", cuda_graphs=False,
                                reduced_vocab_dir=tmp_path / "map")
    with forbid_reference_on_cuda():
        first, again, plain = run(graphs), run(graphs), run(eager)
    assert first == again == plain == full
    assert graphs.runner.weights.lm_head.shape[0] == len(keep)
