"""engine/prefill_steps.py: prefill chunks replayed from CUDA graphs (from token ids and from
embeddings) against the eager steps. The CPU tests of prefill are in test_decode_steps.py."""

import pytest
import torch

from edgellm import LLMEngineRunner
from edgellm.engine.graphs import PrefillKey

from conftest import TINY_PROMPTS


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_prefill_from_ids_graph_matches_eager_and_embeddings(tiny_models):
    """The prefill graphs that start from token ids (the runtime's text path) against the eager runner
    and against prefill_step's graphs from embeddings: buckets 16 and 32, cached prefixes, a second
    replay with other inputs (the graph reads its inputs, nothing of the capture stays)."""
    model_dir, _ = tiny_models["llama"]
    graphed = LLMEngineRunner(model_dir, device="cuda", dtype="float32")
    eager = LLMEngineRunner(model_dir, device="cuda", dtype="float32", cuda_graphs=False)
    longer = [p + p[1:] + [3] * 8 for p in TINY_PROMPTS]  # 20-29 tokens: the 32 bucket
    for prompts in (TINY_PROMPTS, longer, TINY_PROMPTS):
        got, want = graphed.prefill_tokens(prompts), eager.prefill_tokens(prompts)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids = torch.zeros(3, max(map(len, prompts)), dtype=torch.int64, device="cuda")
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        torch.testing.assert_close(graphed.prefill_step(graphed.embed(ids), [len(p) for p in prompts]), want,
                                   rtol=1e-4, atol=1e-4)
        tails = graphed.prefill_tokens(prompts, cached_lengths=[5, 1, 6])
        torch.testing.assert_close(tails, want, rtol=1e-4, atol=1e-4)
    kinds = {(k.length, k.lora, k.few_keys, k.source) for k in graphed.graphs.graphs if isinstance(k, PrefillKey)}
    assert {(16, False, True, "ids"), (32, False, True, "ids"), (16, False, True, "embeds")} <= kinds
