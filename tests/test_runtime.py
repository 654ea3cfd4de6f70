"""Runtime behaviour: stop strings, EOS, streaming, rows leaving the batch, timings."""

import pytest

from edgellm import GenerationItem, LLMGenerationRequest, LLMInferenceRuntime

pytestmark = pytest.mark.reference_ops  # host logic (conftest.py)


@pytest.fixture(scope="module")
def runtime(llama_dir):
    return LLMInferenceRuntime(llama_dir, device="cpu")


def greedy(runtime, items, n=16, **kw):
    return runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=n, temperature=0, **kw))


def test_stop_string_truncates_text_and_frees_the_row(runtime):
    base = greedy(runtime, [{"prompt": "w5 w6 w7"}, {"prompt": "w10 w11"}])
    words = base.output_texts[0].split()
    assert len(words) >= 4
    stop = words[2]
    stopped = greedy(runtime, [{"prompt": "w5 w6 w7"}, {"prompt": "w10 w11"}], stop=[stop])
    cut = base.output_texts[0].find(stop)
    assert stopped.output_texts[0] == base.output_texts[0][:cut]
    assert stopped.finish_reasons[0] == "stop"
    assert len(stopped.output_ids[0]) < len(base.output_ids[0])
    # The other row, decoded on after the first left the batch, is unchanged (unless it stopped too).
    if stop not in base.output_texts[1]:
        assert stopped.output_ids[1] == base.output_ids[1]


def test_eos_finishes_a_row_with_reason_stop(runtime):
    base = greedy(runtime, [{"input_ids": [1, 7, 3]}], n=12)
    first = base.output_ids[0][0]
    # Declare the first generated token an EOS id: the row must end right there.
    runtime.eos_token_ids = frozenset({first})
    try:
        out = greedy(runtime, [{"input_ids": [1, 7, 3]}, {"input_ids": [1, 20]}], n=12)
    finally:
        runtime.eos_token_ids = runtime._eos_ids()
    assert out.output_ids[0] == [first] and out.finish_reasons[0] == "stop"
    assert out.finish_reasons[1] in ("stop", "length")


def test_length_finish_and_generation_items(runtime):
    runtime.eos_token_ids = frozenset()  # this random model may emit its EOS id early
    try:
        out = greedy(runtime, [GenerationItem(input_ids=[1, 40, 41])], n=5)
    finally:
        runtime.eos_token_ids = runtime._eos_ids()
    assert len(out.output_ids[0]) == 5 and out.finish_reasons == ["length"]


def test_streaming_concatenates_to_the_final_text(runtime):
    pieces = {0: [], 1: []}
    out = runtime.handle_request(
        LLMGenerationRequest(requests=[{"prompt": "w5 w6"}, {"messages": [{"role": "user", "content": "w3"}]}],
                             max_generate_length=14, temperature=0),
        on_text=lambda i, delta: pieces[i].append(delta))
    assert "".join(pieces[0]) == out.output_texts[0]
    assert "".join(pieces[1]) == out.output_texts[1]
    assert len(pieces[0]) > 1


def test_streaming_never_emits_a_stop_string(runtime):
    base = greedy(runtime, [{"prompt": "w5 w6 w7"}])
    stop = " ".join(base.output_texts[0].split()[1:3])
    pieces = []
    out = runtime.handle_request(LLMGenerationRequest(requests=[{"prompt": "w5 w6 w7"}], max_generate_length=16,
                                                      temperature=0, stop=stop),
                                 on_text=lambda i, delta: pieces.append(delta))
    assert "".join(pieces) == out.output_texts[0]
    assert stop not in "".join(pieces)


def test_timings_and_dict(runtime):
    out = greedy(runtime, [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 4]}], n=6)
    t = out.timings
    assert t.prefill_ms > 0 and t.total_ms >= t.prefill_ms
    assert t.decode_tokens == sum(len(ids) for ids in out.output_ids) - 2
    assert out.to_dict()["timings"]["decode_tokens_per_s"] > 0


def test_generation_config_defaults_apply(tiny_models, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_models["llama"][0], model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "top_k": 1}))
    runtime = LLMInferenceRuntime(model_dir, device="cpu")
    assert runtime.eos_token_ids >= {2, 5}
    # top_k=1 from generation_config.json makes sampling greedy even at temperature 1.
    sampled = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": [1, 9]}], max_generate_length=8,
                                                          temperature=1.0, seed=3))
    assert sampled.output_ids == greedy(runtime, [{"input_ids": [1, 9]}], n=8).output_ids


def test_running_one_step_ahead_changes_no_answer(runtime, monkeypatch):
    """Steps queued one ahead of the host (rows that finish drop a computed token) give the same
    rows as reading every step before the next: rows leaving at different steps (a stop string, an
    EOS id, the length), sampled with seeds, streamed."""
    import dataclasses

    items = [{"prompt": "w5 w6 w7"}, {"prompt": "w10 w11"}, {"input_ids": [1, 7, 3]}, {"input_ids": [1, 20, 21, 22]}]
    base = greedy(runtime, items, n=12)
    stop = base.output_texts[0].split()[3]
    eos = base.output_ids[2][4]

    def run(ahead):  # (Switches.run_ahead: EDGELLM_RUN_AHEAD when the runner is built)
        monkeypatch.setattr(runtime.runner, "switches", dataclasses.replace(runtime.runner.switches, run_ahead=ahead))
        runtime.eos_token_ids = frozenset({eos})
        pieces = {i: [] for i in range(len(items))}
        try:
            out = runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=12, temperature=0.8,
                                                              seed=5, stop=[stop]),
                                         on_text=lambda i, delta: pieces[i].append(delta))
        finally:
            runtime.eos_token_ids = runtime._eos_ids()
        assert ["".join(pieces[i]) for i in range(len(items))] == out.output_texts
        return out

    ahead, stepwise = run(True), run(False)
    assert ahead.output_ids == stepwise.output_ids and ahead.output_texts == stepwise.output_texts
    assert ahead.finish_reasons == stepwise.finish_reasons
    assert len({len(ids) for ids in ahead.output_ids}) > 1  # the rows left the batch at different steps


def test_a_disk_hit_in_a_fresh_runtime_estimates_the_prefill_it_saved(llama_dir, tmp_path):
    """Before a runtime has prefilled any prompt whole it has no per-token rate of its own: a hit then
    estimates the saving at its own prefill's rate where it prefilled 16 tokens or more, and says it
    is not measured where it prefilled fewer."""
    from edgellm import KVReuseSettings

    settings = KVReuseSettings(gpu_bytes=0, disk_dir=str(tmp_path / "kv"), block_tokens=4)
    prefix = [1] + list(range(10, 17))  # two blocks
    first = LLMInferenceRuntime(llama_dir, device="cpu", kv_reuse=settings)
    greedy(first, [{"input_ids": prefix + list(range(20, 40))}], n=1)
    first.close()
    long_rest = greedy(LLMInferenceRuntime(llama_dir, device="cpu", kv_reuse=settings),
                       [{"input_ids": prefix + list(range(40, 60))}], n=1).kv_reuse
    assert long_rest.hits_disk == 2 and long_rest.reused_tokens == 8 and long_rest.prefill_ms_saved > 0
    assert "prefill saved ~" in long_rest.log_line()
    short_rest = greedy(LLMInferenceRuntime(llama_dir, device="cpu", kv_reuse=settings),
                        [{"input_ids": prefix + [60]}], n=1).kv_reuse
    assert short_rest.reused_tokens == 8 and short_rest.prefill_ms_saved == 0
    assert "prefill saved not measured yet" in short_rest.log_line()
