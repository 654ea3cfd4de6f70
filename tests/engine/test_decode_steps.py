"""The fast decode path (static buffers, sampling inside the step, rows leaving the batch) and
chunked prefill, against the plain eager steps and transformers. CPU here; the same path under CUDA
graphs is checked against eager decoding by the gpu-marked tests at the end."""

import pytest
import torch

from edgellm import LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.graphs import DecodeKey, PrefillKey
from edgellm.errors import ConfigurationError, InvalidRequestError
from edgellm.kernels import forbid_reference_on_cuda, ops

from conftest import TINY_PROMPTS, assert_rows_match_transformers



def _padded(prompts):
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    return ids, [len(p) for p in prompts]


def test_chunked_prefill_gives_the_unchunked_logits_and_cache(tiny_models):
    model_dir, _ = tiny_models["llama"]
    ids, lengths = _padded(TINY_PROMPTS)
    whole = LLMEngineRunner(model_dir, device="cpu", dtype="float32")
    chunked = LLMEngineRunner(model_dir, device="cpu", dtype="float32", prefill_chunk_size=3)
    expected = whole.prefill_step(whole.embed(ids), lengths)
    got = chunked.prefill_step(chunked.embed(ids), lengths)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert chunked.kv_cache.lengths[:3].tolist() == lengths
    for b, n in enumerate(lengths):
        torch.testing.assert_close(chunked.kv_cache.data[:, :, b, :, :n], whole.kv_cache.data[:, :, b, :, :n],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_runs_the_last_layer_on_each_rows_last_token_only(tiny_models, family):
    """forward_logits' default (the last layer past its KV append on each row's last token alone) gives
    the logits of every_token's full last layer at those tokens and the same cache; logits=False (a
    chunk where no row ends) fills the cache alike and returns None."""
    from edgellm.engine.model import forward_logits

    model_dir, _ = tiny_models[family]
    ids, lengths = _padded(TINY_PROMPTS)
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32")
    embeds = runner.embed(ids)
    slots = torch.arange(3, dtype=torch.int32)
    starts = torch.zeros(3, dtype=torch.int32)
    q_lens = torch.tensor(lengths, dtype=torch.int32)

    def run(**kw):
        runner.kv_cache.data.zero_()
        out = forward_logits(runner.weights, runner.config, runner.kv_cache, runner.rope, embeds, slots, starts,
                             q_lens, **kw)
        return out, runner.kv_cache.data.clone()

    full, full_cache = run(every_token=True)
    last, last_cache = run()
    none, none_cache = run(logits=False)
    assert full.shape[:2] == (3, ids.shape[1]) and last.shape == (3, runner.config.vocab_size) and none is None
    torch.testing.assert_close(last, full[torch.arange(3), q_lens.long() - 1], rtol=1e-5, atol=1e-5)
    for cache in (last_cache, none_cache):
        for b, n in enumerate(lengths):  # (past each row's length: its padding's throw-away keys)
            torch.testing.assert_close(cache[:, :, b, :, :n], full_cache[:, :, b, :, :n], rtol=0, atol=0)


def test_prefill_from_token_ids_matches_prefill_from_embeddings(tiny_models):
    """prefill_tokens (ids in, embedded inside the step) gives prefill_step's logits and cache, chunked
    and with cached prefixes (the KV-reuse path: only the tokens after each row's prefix run)."""
    model_dir, _ = tiny_models["llama"]
    ids, lengths = _padded(TINY_PROMPTS)
    reference = LLMEngineRunner(model_dir, device="cpu", dtype="float32")
    expected = reference.prefill_step(reference.embed(ids), lengths)
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", prefill_chunk_size=3)
    torch.testing.assert_close(runner.prefill_tokens(TINY_PROMPTS), expected, rtol=1e-5, atol=1e-5)
    assert runner.kv_cache.lengths[:3].tolist() == lengths
    for b, n in enumerate(lengths):
        torch.testing.assert_close(runner.kv_cache.data[:, :, b, :, :n], reference.kv_cache.data[:, :, b, :, :n],
                                   rtol=1e-5, atol=1e-5)
    # The slots hold the prompts: prefilling only their tails after a cached prefix gives the same logits.
    again = runner.prefill_tokens(TINY_PROMPTS, cached_lengths=[7, 1, 4])
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    for bad in (runner.config.vocab_size, -1, 2 ** 40, 3.0, None):  # past the vocabulary, past int32, not ints
        with pytest.raises(InvalidRequestError, match="token ids"):
            runner.prefill_tokens([TINY_PROMPTS[0], [1, 2, bad]])
    torch.testing.assert_close(runner.prefill_tokens(TINY_PROMPTS), expected, rtol=1e-5, atol=1e-5)  # still usable
    with pytest.raises(InvalidRequestError, match="cached lengths"):
        runner.prefill_tokens([[1, 2, 3]], cached_lengths=[3])
    with pytest.raises(InvalidRequestError, match="block pool"):
        runner.prefill_tokens([[1, 2, 3]], pool_blocks=[(0, 0, 0)])
    # A cached prefix whose blocks come from the attached pools inside the step: slot 2's first two
    # 2-token blocks saved, one in the device pool and one in the host pool, the slot wiped, then
    # prefilled from position 4 after the step copies them back (rows' tables padded to their room).
    data = runner.kv_cache.data
    blocks = data[:, :, 2, :, :4].unflatten(3, (2, 2)).permute(3, 0, 1, 2, 4, 5).contiguous()
    device_pool, host_pool = torch.zeros(3, *blocks.shape[1:]), torch.zeros(4, *blocks.shape[1:])
    device_pool[1], host_pool[3] = blocks[0], blocks[1]
    runner.attach_block_pools(device_pool, host_pool)
    data[:, :, 2].zero_()
    logits = runner.prefill_tokens([TINY_PROMPTS[2]], slots=[2], cached_lengths=[4], pool_blocks=[(1, 0, 2)],
                                   host_blocks=[(3, 1, 2)])
    torch.testing.assert_close(logits, expected[2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="host_blocks"):
        runner.prefill_tokens([[1, 2, 3]], host_blocks=[(4, 0, 0)])


@pytest.mark.reference_ops
def test_chunked_prefill_generation_matches_transformers(tiny_models):
    model_dir, hf_model = tiny_models["qwen2"]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", dtype="float32", prefill_chunk_size=4)
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in TINY_PROMPTS],
                                                           max_generate_length=10, temperature=0))
    assert_rows_match_transformers(response, hf_model, TINY_PROMPTS, 10)


def _eager_reference(runner, ids, lengths, params, steps, keep_after=None, keep=None):
    """Tokens per step from prefill_step / decode_step / ops.sample, the offsets advanced by hand."""
    temperature, top_k, top_p, seeds = params
    logits = runner.prefill_step(runner.embed(ids), lengths)
    offsets = torch.zeros(len(lengths), dtype=torch.int64)
    tokens = ops.sample(logits, temperature, top_k, top_p, seeds, offsets)
    rows = torch.arange(len(lengths))
    history = []
    for step in range(steps):
        if keep_after is not None and step == keep_after:
            rows, tokens = rows[keep], tokens[keep]
        offsets[rows] += 1
        logits = runner.decode_step(runner.embed(tokens[:, None]), slots=rows)
        tokens = ops.sample(logits, temperature[rows], top_k[rows], top_p[rows], seeds[rows], offsets[rows])
        history.append(tokens.tolist())
    return history


def _fast_path(runner, ids, lengths, params, steps, keep_after=None, keep=None):
    temperature, top_k, top_p, seeds = params
    logits = runner.prefill_step(runner.embed(ids), lengths)
    offsets = torch.zeros(len(lengths), dtype=torch.int64)
    tokens = ops.sample(logits, temperature, top_k, top_p, seeds, offsets)
    runner.start_decode(tokens, list(range(len(lengths))), temperature, top_k, top_p, seeds, offsets)
    history = []
    for step in range(steps):
        if keep_after is not None and step == keep_after:
            runner.keep_decode_rows(keep)
        history.append(runner.decode_sample_step().tolist())
    return history


PARAMS = (torch.tensor([0.0, 0.9, 1.3]), torch.tensor([1, 20, 0], dtype=torch.int32),
          torch.tensor([1.0, 0.8, 0.95]), torch.tensor([3, 11, 12345], dtype=torch.int64))


@pytest.mark.reference_ops
@pytest.mark.parametrize("keep", [None, [0, 2], [1]])
def test_decode_sample_step_matches_the_eager_steps(tiny_models, keep):
    model_dir, _ = tiny_models["llama"]
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32")
    ids, lengths = _padded(TINY_PROMPTS)
    keep_after = None if keep is None else 3
    expected = _eager_reference(runner, ids, lengths, PARAMS, 7, keep_after, keep)
    got = _fast_path(runner, ids, lengths, PARAMS, 7, keep_after, keep)
    assert got == expected
    assert runner.decode_logits().shape == (len(got[-1]), runner.config.vocab_size)


@pytest.mark.reference_ops
def test_decode_path_bad_calls(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", max_batch_size=2)
    with pytest.raises(RuntimeError, match="before start_decode"):
        runner.decode_sample_step()
    one = torch.ones(1)
    with pytest.raises(InvalidRequestError, match="outside 1..2"):
        runner.start_decode([1, 2, 3], [0, 1, 1], [0.0] * 3, [1] * 3, [1.0] * 3, [0] * 3, [0] * 3)
    with pytest.raises(InvalidRequestError, match="one entry per row"):
        runner.start_decode([1, 2], [0, 1], one, [1, 1], [1.0, 1.0], [0, 0], [0, 0])
    with pytest.raises(InvalidRequestError, match="distinct values"):
        runner.prefill_step(runner.embed(torch.ones(2, 3, dtype=torch.int64)), [3, 3], slots=[1, 1])
    with pytest.raises(ConfigurationError, match="prefill_chunk_size"):
        LLMEngineRunner(model_dir, device="cpu", prefill_chunk_size=0)
    assert runner.capture_decode_graphs() == []  # no CUDA: eager decode, nothing to capture
    runner.start_decode([1, 2], [0, 1], [0.0] * 2, [1] * 2, [1.0] * 2, [0] * 2, [0] * 2)
    with pytest.raises(InvalidRequestError, match=r"keep_decode_rows: indices must be in \[0, 2\)"):
        runner.keep_decode_rows([2])


@pytest.mark.reference_ops
def test_restart_decode_rows_rewinds_like_a_new_start(tiny_models):
    """Greedy rows decoded a few steps, then pointed back at other tokens and shorter cache lengths,
    continue exactly as a fresh start_decode from there would."""
    model_dir, _ = tiny_models["llama"]
    ids, lengths = _padded(TINY_PROMPTS[:2])
    greedy = ([0.0] * 2, [1] * 2, [1.0] * 2, [0] * 2, [0] * 2)
    runs = []
    for restart in (True, False):
        runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", max_batch_size=2)
        runner.prefill_step(runner.embed(ids), lengths)
        runner.start_decode([5, 6], [0, 1], *greedy)
        for _ in range(4):
            runner.decode_sample_step()
        rewind = [lengths[0] + 2, lengths[1] + 1]
        if restart:
            runner.restart_decode_rows(torch.tensor([9, 10]), rewind)
        else:
            runner.kv_cache.lengths[:2] = torch.tensor(rewind, dtype=torch.int32)
            runner.start_decode([9, 10], [0, 1], *greedy)
        runs.append([runner.decode_sample_step().tolist() for _ in range(3)])
        assert runner.kv_cache.lengths[:2].tolist() == [n + 3 for n in rewind]
    assert runs[0] == runs[1]
    with pytest.raises(InvalidRequestError, match="2 tokens"):
        runner.restart_decode_rows([1], None)


def _alone(runner, prompt, params, steps):
    """One prompt's first sampled token and its next `steps` tokens, alone in slot 0."""
    temperature, top_k, top_p, seed = params
    logits = runner.prefill_step(runner.embed(torch.tensor([prompt])), [len(prompt)])
    first = ops.sample(logits, *(torch.tensor([x]) for x in params), torch.zeros(1, dtype=torch.int64))
    runner.start_decode(first, [0], [temperature], [top_k], [top_p], [seed], [0])
    tokens = [first.item()] + [runner.decode_sample_step().item() for _ in range(steps)]
    runner.end_decode()
    return tokens


@pytest.mark.reference_ops
def test_rows_joining_the_batch_decode_as_they_would_alone(tiny_models):
    """A row decodes 3 steps alone; two prompts are then prefilled into other slots while it waits and
    join it (add_decode_rows, one greedy and one sampled); 5 more steps. Every row's tokens equal its
    run alone, and the running row's RNG offsets and slot are untouched by the joining."""
    model_dir, _ = tiny_models["llama"]
    settings = [(0.9, 20, 0.8, 11), (0.0, 1, 1.0, 0), (1.3, 0, 0.95, 12345)]
    alone = [_alone(LLMEngineRunner(model_dir, device="cpu", dtype="float32"), p, s, 8)
             for p, s in zip(TINY_PROMPTS, settings)]
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", max_batch_size=3)
    prompt, (temperature, top_k, top_p, seed) = TINY_PROMPTS[0], settings[0]
    logits = runner.prefill_step(runner.embed(torch.tensor([prompt])), [len(prompt)], slots=[2])
    token = ops.sample(logits, *(torch.tensor([x]) for x in settings[0]), torch.zeros(1, dtype=torch.int64))
    runner.start_decode(token, [2], [temperature], [top_k], [top_p], [seed], [0])
    got = [[token.item()] + [runner.decode_sample_step().item() for _ in range(3)], [], []]
    ids, lengths = _padded(TINY_PROMPTS[1:])
    logits = runner.prefill_step(runner.embed(ids), lengths, slots=[0, 1])
    params = [torch.tensor(column) for column in zip(*settings[1:])]
    tokens = ops.sample(logits, *params, torch.zeros(2, dtype=torch.int64))
    runner.add_decode_rows(tokens, [0, 1], *params, [0, 0])
    got[1], got[2] = [tokens[0].item()], [tokens[1].item()]
    for _ in range(5):
        for row, token in zip(got, runner.decode_sample_step().tolist()):
            row.append(token)
    assert got[0] == alone[0][:9] and got[1] == alone[1][:6] and got[2] == alone[2][:6]
    runner.keep_decode_rows([0, 1])  # slots 2 and 0 go on
    with pytest.raises(InvalidRequestError, match="already running"):
        runner.add_decode_rows([1], [2], [0.0], [1], [1.0], [0], [0])
    with pytest.raises(InvalidRequestError, match="exceed max_batch_size 3"):
        runner.add_decode_rows([1, 1], [1, 0], [0.0] * 2, [1] * 2, [1.0] * 2, [0] * 2, [0] * 2)
    runner.end_decode()
    runner.add_decode_rows([1], [1], [0.0], [1], [1.0], [0], [0])  # no batch running: a start
    assert runner.decode_sample_step().shape == (1,)


# ---- on a CUDA GPU ----

def _decode_runs(model_dir, params, keep=None, **runner_kw):

    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float32", max_batch_size=4, **runner_kw)
    ids, lengths = _padded(TINY_PROMPTS)
    cuda_params = tuple(p.cuda() for p in params)
    with forbid_reference_on_cuda():
        return runner, _fast_path(runner, ids.cuda(), lengths, cuda_params, 12, None if keep is None else 4, keep)


GREEDY = (torch.zeros(3), torch.ones(3, dtype=torch.int32), torch.ones(3), torch.zeros(3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_graph_replay_gives_the_eager_tokens(tiny_models, sampling):

    model_dir, _ = tiny_models["llama"]
    params = GREEDY if sampling == "greedy" else PARAMS
    graphed, with_graphs = _decode_runs(model_dir, params, keep=[0, 2])
    eager, without = _decode_runs(model_dir, params, keep=[0, 2], cuda_graphs=False)
    assert with_graphs == without
    # 3 rows ran padded to the size-4 graph, then 2 rows on the size-2 graph; the eager runner has none.
    assert sorted(k.size for k in graphed.graphs.graphs if isinstance(k, DecodeKey)) == [2, 4]
    assert [(k.rows, k.length) for k in graphed.graphs.graphs if isinstance(k, PrefillKey)] == [(3, 16)]  # 11 tokens
    assert not eager.graphs.graphs


@pytest.mark.gpu
def test_rows_leaving_the_batch_do_not_change_the_others(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    _, full = _decode_runs(model_dir, GREEDY)
    _, shrunk = _decode_runs(model_dir, GREEDY, keep=[0, 2])
    assert [step[0] for step in shrunk] == [step[0] for step in full]
    assert [step[-1] for step in shrunk] == [step[2] for step in full]


@pytest.mark.gpu
def test_capture_up_front_and_no_memory_growth_over_200_requests(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=4)
    assert runtime.runner.capture_decode_graphs() == [1, 2, 4]
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in TINY_PROMPTS], max_generate_length=6,
                                   temperature=0.7, seed=1)
    first = runtime.handle_request(request)
    for _ in range(5):
        runtime.handle_request(request)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(200):
        last = runtime.handle_request(request)
    torch.cuda.synchronize()
    assert last.output_ids == first.output_ids
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() == reserved
    assert len(runtime.runner.graphs.graphs) == 3 + 1  # decode sizes 1, 2, 4; one prefill bucket
