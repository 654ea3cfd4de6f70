"""Speculative decoding in the runtime: outputs exactly those of plain decoding (greedy and seeded
sampling, n-gram and draft proposers, chains and trees, batches), sampled distributions unchanged,
every runtime feature kept (stop strings, EOS, max length, streaming, LoRA, KV reuse), bad settings
refused. Runtime-level runs go through the torch references (what CPU users run; the Triton kernels
of the verify step are checked in tests/kernels/test_tree_*.py and, inside the runner, tests/engine/test_verify.py),
except one run through the interpreter."""

import math
import shutil

import pytest
from safetensors.torch import load_file, save_file

from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime, SpeculativeConfig
from edgellm.errors import ConfigurationError, InvalidRequestError, ModelLoadError
from edgellm.engine.graphs import VerifyKey
from edgellm.kernels import forbid_reference_on_cuda, use_reference

from conftest import build_model

# Prompts with repeats (the n-gram proposer finds matches) of three lengths.
PROMPTS = [[1] + [5, 6, 7, 8, 9] * 4, [1, 50, 6, 7, 50, 6], [1] + list(range(10, 40)) + list(range(10, 20))]
LIMITS = dict(max_batch_size=3, max_input_length=64, max_kv_cache_capacity=128)


def _request(prompts=PROMPTS, n=24, **kw):
    kw.setdefault("temperature", 0)
    return LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts], max_generate_length=n, **kw)


def _runtime(model_dir, speculative=None, **kw):
    return LLMInferenceRuntime(model_dir, device="cpu", dtype="float32", speculative=speculative, **{**LIMITS, **kw})


def _same_as_plain(plain, spec, request):
    with use_reference():
        expected = plain.handle_request(request)
        got = spec.handle_request(request)
    assert got.output_ids == expected.output_ids
    assert got.output_texts == expected.output_texts and got.finish_reasons == expected.finish_reasons
    return got


@pytest.fixture(scope="module")
def wrong_draft(tiny_models, tmp_path_factory):
    """The tiny llama with its LM head rolled by one token: its greedy guess is never the model's."""
    model_dir = tmp_path_factory.mktemp("wrong_draft")
    for f in tiny_models["llama"][0].iterdir():
        shutil.copy(f, model_dir / f.name)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].roll(1, 0).contiguous()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("config", [
    SpeculativeConfig(ngram_branches=1), SpeculativeConfig(), SpeculativeConfig(max_verify_tokens=5, adaptive=False),
    "self-draft chain", "self-draft tree"])
def test_greedy_output_is_token_identical(tiny_models, family, config):
    model_dir, _ = tiny_models[family]
    if isinstance(config, str):
        config = SpeculativeConfig(method="draft", draft_model=model_dir, num_speculative_tokens=4,
                                   draft_top_k=1 if config.endswith("chain") else 3)
    got = _same_as_plain(_runtime(model_dir), _runtime(model_dir, config), _request())
    stats = got.speculative
    assert stats.verify_steps > 0 and stats.proposed > 0
    assert [len(f) for f in stats.accepted_flags] == [len(ids) for ids in got.output_ids]
    assert sum(map(sum, stats.accepted_flags)) <= stats.accepted
    if config.method == "draft":  # the model is its own draft: every chain token is the model's choice
        assert stats.accepted > 0 and stats.tokens_per_step > 2


def test_through_the_triton_interpreter(tiny_models):
    """The runtime's speculative path with the kernels themselves (interpreter on the CPU)."""
    model_dir, _ = tiny_models["llama"]
    request = _request(PROMPTS[:2], n=10)
    expected = _runtime(model_dir).handle_request(request).output_ids
    got = _runtime(model_dir, SpeculativeConfig(max_verify_tokens=8)).handle_request(request)
    assert got.output_ids == expected and got.speculative.verify_steps > 0


def test_a_draft_that_is_always_wrong_changes_nothing(tiny_models, wrong_draft):
    model_dir, _ = tiny_models["llama"]
    got = _same_as_plain(_runtime(model_dir), _runtime(model_dir, SpeculativeConfig(
        method="draft", draft_model=wrong_draft, num_speculative_tokens=3)), _request())
    assert got.speculative.proposed > 0 and got.speculative.accepted == 0
    assert got.speculative.plain_steps > 0  # the adaptive back-off stopped proposing for a while


def test_self_draft_accepts_everything(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    spec = _runtime(model_dir, SpeculativeConfig(method="draft", draft_model=model_dir, num_speculative_tokens=5))
    with use_reference():
        got = spec.handle_request(_request([PROMPTS[1]], n=30))
    assert got.speculative.accepted == got.speculative.proposed > 0


def test_seeded_sampling_repeats_and_equals_plain_sampling(tiny_models):
    model_dir, _ = tiny_models["llama"]
    request = _request(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    spec = _runtime(model_dir, SpeculativeConfig())
    got = _same_as_plain(_runtime(model_dir), spec, request)
    with use_reference():
        assert spec.handle_request(request).output_ids == got.output_ids


def _chi_square_p_small(counts_a: dict, counts_b: dict) -> float:
    """Chi-square statistic of two samples' category counts, and its 99.9% critical value."""
    keys = [k for k in set(counts_a) | set(counts_b) if counts_a.get(k, 0) + counts_b.get(k, 0) >= 10]
    n_a, n_b = sum(counts_a[k] for k in keys if k in counts_a), sum(counts_b[k] for k in keys if k in counts_b)
    stat = 0.0
    for k in keys:
        a, b = counts_a.get(k, 0), counts_b.get(k, 0)
        expect_a = (a + b) * n_a / (n_a + n_b)
        expect_b = (a + b) * n_b / (n_a + n_b)
        stat += (a - expect_a) ** 2 / expect_a + (b - expect_b) ** 2 / expect_b
    dof = len(keys) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, p = 0.001
    return stat, critical


def test_sampled_distribution_of_the_first_tokens_matches_plain_sampling(tiny_models):
    """3200 draws each, different seeds: the first three tokens' distributions (each position, and
    the pair at positions 2-3, which come from speculative steps) match plain sampling's."""
    model_dir, _ = tiny_models["llama"]
    # The model as its own draft proposes at every step; its greedy guesses are accepted with the
    # probability the sampler gives them.
    config = SpeculativeConfig(method="draft", draft_model=model_dir, num_speculative_tokens=2, adaptive=False)
    runtimes = {"plain": _runtime(model_dir, max_batch_size=64), "spec": _runtime(model_dir, config, max_batch_size=64)}
    samples = {name: [] for name in runtimes}
    accepted = 0
    for name, runtime in runtimes.items():
        runtime.eos_token_ids = frozenset()  # every row gets its 3 tokens
        for r in range(50):
            seed = 1000 * r + (0 if name == "plain" else 500)
            request = _request([PROMPTS[1]] * 64, n=3, temperature=0.8, top_k=20, top_p=0.9, seed=seed)
            with use_reference():
                response = runtime.handle_request(request)
            samples[name] += [tuple(ids) for ids in response.output_ids]
            if name == "spec":
                assert response.speculative.verify_steps > 0
                accepted += response.speculative.accepted
    assert accepted > 100  # the speculative steps did produce tokens
    for position in ([0], [1], [2], [1, 2]):
        counts = {}
        for name in samples:
            counts[name] = {}
            for s in samples[name]:
                key = tuple(s[p] for p in position)
                counts[name][key] = counts[name].get(key, 0) + 1
        stat, critical = _chi_square_p_small(counts["plain"], counts["spec"])
        assert stat < critical, (position, stat, critical)


def test_runtime_features_under_speculation(tiny_models, lora_adapters, tmp_path):
    """Stop strings, an EOS inside an accepted run, max_generate_length, streaming, LoRA per row and
    KV reuse: the same outputs as without speculation."""
    model_dir, _ = tiny_models["llama"]
    adapters = {name: path for name, (path, _) in lora_adapters.items()}
    plain = _runtime(model_dir, lora_weights=adapters)
    spec = _runtime(model_dir, SpeculativeConfig(), lora_weights=adapters,
                    kv_reuse=KVReuseSettings(gpu_bytes=1 << 20, block_tokens=4))
    base = _same_as_plain(plain, spec, _request())
    # A stop string cut from the middle of row 0's text, and an EOS id taken from inside an accepted run.
    words = base.output_texts[0].split()
    _same_as_plain(plain, spec, _request(stop=[" ".join(words[3:5])]))
    accepted = [i for i, flag in enumerate(base.speculative.accepted_flags[0]) if flag]
    eos = base.output_ids[0][accepted[len(accepted) // 2]]
    for runtime in (plain, spec):
        runtime.eos_token_ids = frozenset({eos})
    try:
        cut = _same_as_plain(plain, spec, _request())
        assert cut.output_ids[0][-1] == eos and cut.finish_reasons[0] == "stop"
    finally:
        plain.eos_token_ids, spec.eos_token_ids = plain._eos_ids(), spec._eos_ids()
    for n in (1, 2, 7):
        short = _same_as_plain(plain, spec, _request(n=n))
        assert max(map(len, short.output_ids)) <= n
    pieces = {}
    with use_reference():
        streamed = spec.handle_request(_request(), on_text=lambda i, d: pieces.setdefault(i, []).append(d))
    assert ["".join(pieces[i]) for i in range(3)] == streamed.output_texts == base.output_texts
    items = [{"input_ids": p, "lora_weights_name": name} for p, name in zip(PROMPTS, ["a", "b", ""])]
    mixed = LLMGenerationRequest(requests=items, max_generate_length=20, temperature=0)
    assert _same_as_plain(plain, spec, mixed).speculative.verify_steps > 0
    assert spec.kv_reuse_stats().reused_tokens > 0


def test_one_request_can_turn_speculation_off(tiny_models):
    model_dir, _ = tiny_models["llama"]
    spec = _runtime(model_dir, SpeculativeConfig())
    with use_reference():
        off = spec.handle_request(_request(speculative=False))
        on = spec.handle_request(_request())
    assert off.speculative is None and on.speculative is not None and off.output_ids == on.output_ids
    assert "speculative" in on.to_dict() and "speculative" not in off.to_dict()
    with pytest.raises(InvalidRequestError, match="speculative must be"):
        spec.handle_request(_request(speculative="yes"))


def test_bad_speculative_settings_are_refused_before_loading(tiny_models, tmp_path):
    model_dir, _ = tiny_models["llama"]
    bad = [(SpeculativeConfig(method="medusa"), "unknown speculative method"),
           (SpeculativeConfig(max_verify_tokens=65), "max_verify_tokens"),
           (SpeculativeConfig(max_verify_tokens=1), "max_verify_tokens"),
           (SpeculativeConfig(ngram_candidates=0), "ngram_candidates"),
           (SpeculativeConfig(method="draft"), "needs draft_model"),
           (SpeculativeConfig(method="draft", draft_model=tmp_path / "missing"), "does not exist"),
           (SpeculativeConfig(method="draft", draft_model=model_dir, num_speculative_tokens=8, draft_top_k=3),
            "exceeds max_verify_tokens"),
           (SpeculativeConfig(draft_model=model_dir), "method is 'ngram'")]
    for config, message in bad:
        with pytest.raises(ConfigurationError, match=message):
            _runtime(model_dir, config)
    with pytest.raises(ConfigurationError, match="SpeculativeConfig"):
        _runtime(model_dir, {"method": "ngram"})
    other_vocab = tmp_path / "other_vocab"
    build_model("llama", other_vocab, vocab_size=80)
    with pytest.raises(ConfigurationError, match="vocab_size 80"):
        _runtime(model_dir, SpeculativeConfig(method="draft", draft_model=other_vocab))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelLoadError):
        _runtime(model_dir, SpeculativeConfig(method="draft", draft_model=not_a_model))


# ---- on a CUDA GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_speculative_greedy_on_gpu_is_token_identical(tiny_models, family):
    """fp16, CUDA graphs: n-gram trees and the model as its own draft give exactly the tokens of the
    same runtime with speculation off; the verify graphs are the ones that ran."""
    from edgellm import SpeculativeConfig

    model_dir, _ = tiny_models[family]
    prompts = [[1] + [5, 6, 7, 8, 9] * 4, [1, 50, 6, 7, 50, 6], [1] + list(range(10, 40)) + list(range(10, 20))]
    for config in (SpeculativeConfig(), SpeculativeConfig(method="draft", draft_model=model_dir, draft_top_k=2)):
        runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=3, speculative=config)
        request = dict(requests=[{"input_ids": p} for p in prompts], max_generate_length=32, temperature=0)
        with forbid_reference_on_cuda():
            plain = runtime.handle_request(LLMGenerationRequest(**request, speculative=False))
            spec = runtime.handle_request(LLMGenerationRequest(**request))
            sampled = [runtime.handle_request(LLMGenerationRequest(**{**request, "temperature": 0.8}, seed=3,
                                                                   speculative=s)).output_ids for s in (False, True)]
        assert spec.output_ids == plain.output_ids
        assert spec.speculative.verify_steps > 0 and spec.speculative.accepted > 0
        assert sampled[0] == sampled[1]
        assert any(isinstance(k, VerifyKey) for k in runtime.runner.graphs.graphs)
