"""KV reuse in three tiers (engine/kv_store.py, kv_disk.py): the seeds' scenarios on a tiny model
(float32, CPU, greedy), each checked against a runtime that reuses nothing, then the disk tier's
robustness (bad files, concurrent writers, unwritable or full directories)."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.graphs import PrefillKey
from edgellm.engine.kv_disk import DiskTier
from edgellm.errors import ConfigurationError
from edgellm.kernels import forbid_reference_on_cuda

from conftest import DEVICES

BLOCK = 8
SYSTEM = [1] + [(7 * i) % 90 + 5 for i in range(39)]   # 40 tokens: five blocks of 8
QUESTIONS = [[11, 23, 35], [12, 44, 56, 3]]
PROMPT_A = [1] + [(5 * i) % 80 + 7 for i in range(32)]  # 33 tokens: four whole blocks reusable
PROMPT_B = [1] + [(3 * i) % 70 + 9 for i in range(32)]
NEW = 4


def run(runtime, prompts):
    return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                       max_generate_length=NEW, temperature=0))


def block_bytes(runtime) -> int:
    cache = runtime.kv_cache.data
    layers, _, _, kv_heads, _, head_dim = cache.shape
    return layers * 2 * kv_heads * BLOCK * head_dim * cache.element_size()


class _Cold:
    """The reference: the same model with no KV reuse; outputs remembered (the interpreter is slow)."""

    def __init__(self, model_dir):
        self.runtime = LLMInferenceRuntime(model_dir, device="cpu")
        self.kv_cache = self.runtime.runner.kv_cache
        self.seen: dict = {}

    def ids(self, prompts) -> list[list[int]]:
        out = []
        for p in prompts:
            if tuple(p) not in self.seen:
                self.seen[tuple(p)] = run(self.runtime, [p]).output_ids[0]
            out.append(self.seen[tuple(p)])
        return out


@pytest.fixture(scope="module")
def cold(tiny_models):
    return _Cold(tiny_models["llama"][0])


def test_same_system_prompt_reuses_its_kv(tiny_models, cold, caplog):
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu",
                                  kv_reuse=KVReuseSettings(gpu_bytes=1 << 24, block_tokens=BLOCK))
    first = run(runtime, [SYSTEM + QUESTIONS[0]])
    assert first.kv_reuse.reused_blocks == 0 and first.kv_reuse.stored_blocks == 5
    with caplog.at_level("INFO", logger="edgellm"):
        second = run(runtime, [SYSTEM + QUESTIONS[1]])
    assert any("reused blocks 5 of 5" in r.getMessage() and "cache hit rate 1.00" in r.getMessage()
               for r in caplog.records)
    stats = second.kv_reuse
    assert stats.hits_gpu == 5 and stats.reused_tokens == 40 and stats.blocks_looked_up == 5
    assert stats.hit_rate == 1.0 and stats.prefill_ms_saved > 0
    assert second.output_ids == cold.ids([SYSTEM + QUESTIONS[1]])
    assert first.output_ids == cold.ids([SYSTEM + QUESTIONS[0]])
    total = runtime.kv_reuse_stats()
    assert total.lookups == 2 and total.hits_gpu == 5 and total.stored_blocks == 5 + 0
    assert "reused blocks 5 of 5" in stats.log_line() and "cache hit rate 1.00" in stats.log_line()
    assert json.loads(json.dumps(second.to_dict()))["kv_reuse"]["reused_blocks"] == 5


def test_reuse_in_a_batch_and_per_adapter(tiny_models, lora_adapters, cold):
    """Rows of one batch reuse independently; a prefix saved under one adapter is not another's."""
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", lora_weights={"a": lora_adapters["a"][0]},
                                  kv_reuse=KVReuseSettings(gpu_bytes=1 << 24, block_tokens=BLOCK))
    run(runtime, [SYSTEM + QUESTIONS[0]])
    batch = run(runtime, [SYSTEM + QUESTIONS[1], PROMPT_A])
    assert batch.kv_reuse.hits_gpu == 5 and batch.kv_reuse.lookups == 2
    assert batch.output_ids == cold.ids([SYSTEM + QUESTIONS[1], PROMPT_A])
    other = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": SYSTEM + QUESTIONS[1]}],
                                                        max_generate_length=NEW, temperature=0,
                                                        lora_weights_name="a"))
    assert other.kv_reuse.reused_blocks == 0  # the base model's KV is not the adapter's


@pytest.mark.parametrize("host", [False, True, "only"])
def test_alternating_prompts_with_a_gpu_tier_of_one_prompt(tiny_models, cold, host):
    """Seed 003's offload demo: A, B, A, B with room for one prompt on the device (or, "only", no
    device tier: every hit is read from the host tier)."""
    one_prompt = 4 * block_bytes(cold)
    settings = KVReuseSettings(gpu_bytes=0 if host == "only" else one_prompt,
                               host_bytes=one_prompt * 4 if host else 0, block_tokens=BLOCK)
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", kv_reuse=settings)
    outputs = [run(runtime, [p]) for p in (PROMPT_A, PROMPT_B, PROMPT_A, PROMPT_B)]
    reused = sum(r.kv_reuse.reused_blocks for r in outputs)
    if host:
        assert reused == 8 and outputs[2].kv_reuse.hits_host == 4 and outputs[3].kv_reuse.hits_host == 4
    else:
        assert reused == 0
    expected = {tuple(p): cold.ids([p]) for p in (PROMPT_A, PROMPT_B)}
    for prompt, response in zip((PROMPT_A, PROMPT_B, PROMPT_A, PROMPT_B), outputs):
        assert response.output_ids == expected[tuple(prompt)]


_PROCESS_SCRIPT = """
import json, sys
from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime
model, disk, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
runtime = LLMInferenceRuntime(model, device="cpu", kv_reuse=KVReuseSettings(gpu_bytes=0, disk_dir=disk, block_tokens=8))
r = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=4, temperature=0))
runtime.close()
print(json.dumps({"ids": r.output_ids, "stats": r.kv_reuse.as_dict()}))
"""


def _in_process(model_dir, disk, prompt):
    out = subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT, str(model_dir), str(disk), json.dumps(prompt)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_share_a_disk_directory(tiny_models, tmp_path, cold):
    """Seed 003's connector demo: the second process finds the first one's blocks on disk."""
    first = _in_process(tiny_models["llama"][0], tmp_path / "kv", SYSTEM + QUESTIONS[0])
    assert first["stats"]["stored_blocks"] == 5 and first["stats"]["reused_blocks"] == 0
    assert len(list((tmp_path / "kv").glob("*.kvb"))) == 5
    second = _in_process(tiny_models["llama"][0], tmp_path / "kv", SYSTEM + QUESTIONS[0])
    assert second["stats"]["hits_disk"] == 5
    assert second["ids"] == first["ids"] == cold.ids([SYSTEM + QUESTIONS[0]])


def _disk_runtime(tiny_models, directory):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu",
                               kv_reuse=KVReuseSettings(gpu_bytes=0, disk_dir=directory, block_tokens=BLOCK))


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "foreign model", "foreign dtype"])
def test_bad_disk_files_are_refused_and_replaced(tiny_models, tmp_path, cold, damage):
    runtime = _disk_runtime(tiny_models, tmp_path)
    run(runtime, [SYSTEM + QUESTIONS[0]])
    runtime.close()
    files = sorted(tmp_path.glob("*.kvb"))
    store = runtime.kv_store
    first = store.disk.path(store.keys(SYSTEM, "")[0])  # block 0: damaging it stops the whole prefix
    data = first.read_bytes()
    if damage == "truncated":
        first.write_bytes(data[:len(data) // 2])
    elif damage == "corrupted":
        first.write_bytes(data[:-5] + bytes(b ^ 0xFF for b in data[-5:]))
    else:
        field = "model" if damage == "foreign model" else "dtype"
        header_end = data.index(b"\n", len(b"EDGELLM-KV\n"))
        header = json.loads(data[len(b"EDGELLM-KV\n"):header_end])
        header[field] = "something else"
        first.write_bytes(b"EDGELLM-KV\n" + json.dumps(header).encode() + data[header_end:])
    assert len(files) == 5
    again = _disk_runtime(tiny_models, tmp_path)
    response = run(again, [SYSTEM + QUESTIONS[1]])
    again.close()
    assert response.kv_reuse.reused_blocks == 0 and again.kv_store.disk.rejected == 1
    assert response.output_ids == cold.ids([SYSTEM + QUESTIONS[1]])
    assert again.kv_store.disk.read(again.kv_store.keys(SYSTEM, "")[0]) is not None  # written afresh


def _hammer(directory: str, identity: dict, seed: int) -> None:
    disk = DiskTier(directory, identity)
    block = torch.full(identity["layout"], float(seed))
    for _ in range(30):
        disk._write_now(b"\x01" * 20, block)


def test_two_writers_of_one_key_never_leave_a_torn_file(tmp_path):
    identity = {"model": "m", "dtype": "torch.float32", "layout": [2, 2, 2, 64, 16]}
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(str(tmp_path), identity, seed)) for seed in (1, 2)]
    for w in workers:
        w.start()
    reader = DiskTier(tmp_path, identity)
    seen = []
    while any(w.is_alive() for w in workers):
        if reader.path(b"\x01" * 20).exists():
            data = torch.frombuffer(bytearray(reader.path(b"\x01" * 20).read_bytes()), dtype=torch.uint8)
            block = reader._decode(data, b"\x01" * 20)
            assert block is not None  # every file a reader finds is whole
            seen.append(float(block.flatten()[0]))
    for w in workers:
        w.join()
        assert w.exitcode == 0
    assert reader.read(b"\x01" * 20) is not None and set(seen) <= {1.0, 2.0}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_block_still_waiting_for_the_writer_is_found(tmp_path):
    """A block queued for the disk and not written yet (its copy in not finished: the writer waits on
    `ready`) is there for has() and read() at once, from memory; then it is on disk."""
    identity = {"model": "m", "dtype": "torch.float32", "layout": [2, 2, 2, 4, 16]}
    tier = DiskTier(tmp_path, identity)
    copied = threading.Event()
    ready = type("Ready", (), {"synchronize": lambda self: copied.wait()})()
    block = torch.randn(2, 2, 2, 4, 16)
    key = b"\x02" * 20
    tier.write(key, block, ready)
    assert tier.has(key) and not tier.path(key).exists()
    threading.Timer(0.2, copied.set).start()
    assert torch.equal(tier.read(key), block)  # (waits for the copy)
    tier.flush()
    assert tier.path(key).exists() and torch.equal(DiskTier(tmp_path, identity).read(key), block)


def test_unwritable_directory_turns_the_disk_tier_off_once(tiny_models, tmp_path, cold):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the directory should be")
    with pytest.warns(RuntimeWarning, match="disk tier") as caught:
        runtime = _disk_runtime(tiny_models, blocker / "kv")
        responses = [run(runtime, [SYSTEM + q]) for q in QUESTIONS]
    assert len([w for w in caught if "disk tier" in str(w.message)]) == 1
    assert [r.output_ids for r in responses] == [cold.ids([SYSTEM + q]) for q in QUESTIONS]


def test_full_disk_turns_the_disk_tier_off_and_loses_no_request(tiny_models, tmp_path, cold, monkeypatch):
    import errno

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("edgellm.engine.kv_disk.os.replace", no_space)
    runtime = _disk_runtime(tiny_models, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        responses = [run(runtime, [SYSTEM + q]) for q in QUESTIONS]
        runtime.close()
    assert len([w for w in caught if "disk tier" in str(w.message)]) == 1
    assert not runtime.kv_store.disk.enabled and not list(tmp_path.iterdir())  # no temporary file left
    assert [r.output_ids for r in responses] == [cold.ids([SYSTEM + q]) for q in QUESTIONS]


def test_keys_name_prefixes():
    from edgellm.engine.kv_store import KVReuseSettings as Settings, TieredKVStore
    from edgellm.engine.kv_cache import LinearKVCache

    cache = LinearKVCache(num_layers=1, max_batch_size=1, num_kv_heads=1, capacity=64, head_dim=4,
                          dtype=torch.float32, device=torch.device("cpu"))
    store = TieredKVStore(cache, Settings(gpu_bytes=1 << 20, block_tokens=4), "model-x")
    a = store.keys(list(range(10)), "")
    assert len(a) == 2 and store.keys(list(range(8)) + [99, 98, 97], "") == a  # only whole blocks count
    assert store.keys([0, 1, 2, 3, 9, 9, 9, 9], "")[0] == a[0] and store.keys([0, 1, 2, 3, 9, 9, 9, 9], "")[1] != a[1]
    assert store.keys(list(range(10)), "adapter")[0] != a[0]
    other = TieredKVStore(cache, Settings(gpu_bytes=1 << 20, block_tokens=4), "model-y")
    assert other.keys(list(range(10)), "")[0] != a[0]
    # Chains of recent prompts are remembered and extended: the same keys as a store that hashes all.
    history = list(range(30, 50))  # five blocks
    for prompt, adapter in ((history, ""), (history + [1, 2, 3, 4, 5], ""), (history[:9] + [7] * 8, ""),
                            (history[:6] + [0] + history[7:], ""), (history + [1], "adapter"), (history[:3], ""),
                            (tuple(history[:12]), "")):
        new = TieredKVStore(cache, Settings(gpu_bytes=1 << 20, block_tokens=4), "model-x")
        assert store.keys(prompt, adapter) == new.keys(list(prompt), adapter)
        assert len(prompt) < 4 or store._recent[0][1] == list(prompt[:len(prompt) // 4 * 4]) \
            or len(store._known_keys(list(prompt), len(prompt) // 4 * 4, adapter)) == len(prompt) // 4


@pytest.mark.parametrize("device", DEVICES)
def test_store_restores_blocks_exactly_from_mixed_tiers(device):
    """The device pool and the host tier at the level of the store: a prompt larger than the pool
    (saved one block at a time), then LRU moves that leave its blocks alternating between the tiers,
    so a restore copies non-adjacent positions from each. The restored slot equals what was saved."""
    from edgellm.engine.kv_cache import LinearKVCache
    from edgellm.engine.kv_store import KVReuseStats, TieredKVStore

    cache = LinearKVCache(num_layers=2, max_batch_size=2, num_kv_heads=2, capacity=64, head_dim=4,
                          dtype=torch.float32, device=torch.device(device))
    block = 2 * 2 * 2 * 4 * 4 * 4  # layers x K/V x kv_heads x tokens x head_dim x bytes
    store = TieredKVStore(cache, KVReuseSettings(gpu_bytes=3 * block, host_bytes=16 * block, block_tokens=4), "m")
    a, b = list(range(100, 125)), list(range(200, 205))  # six whole blocks and one
    cache.data.normal_()
    saved_a = cache.data[:, :, 0, :, :24].clone()

    def restore(tokens):
        stats = KVReuseStats()
        cache.data[:, :, 1].zero_()
        reused = store.restore(1, len(tokens), store.keys(tokens, ""), stats)
        return reused, stats

    store.save(0, store.keys(a, ""), KVReuseStats())  # blocks 3, 4, 5 stay on the device, 0, 1, 2 move to the host
    reused, stats = restore(a)
    assert (reused, stats.hits_host, stats.hits_gpu) == (24, 3, 3)
    assert torch.equal(cache.data[:, :, 1, :, :24], saved_a)
    promoted = KVReuseStats()
    store.save(1, store.keys(a, ""), promoted)  # promotes blocks 0-2 from slot 1: 3-5 move to the host
    keys_a = store.keys(a, "")
    assert promoted.stored_blocks == 0 and len(store.gpu.where) == 3 and len(store.host.where) == 3
    assert all(k in store.gpu for k in keys_a[:3]) and all(k in store.host for k in keys_a[3:])
    restore(a[:5])  # block 0 becomes the most recently used
    cache.data[:, :, 0].normal_()
    store.save(0, store.keys(b, ""), KVReuseStats())  # evicts block 1 to the host
    saved_b = cache.data[:, :, 0, :, :4].clone()
    reused, stats = restore(a)  # device: blocks 0 and 2; host: 1, 3, 4, 5
    assert (reused, stats.hits_gpu, stats.hits_host) == (24, 2, 4)
    assert torch.equal(cache.data[:, :, 1, :, :24], saved_a)
    reused, stats = restore(b)
    assert reused == 4 and torch.equal(cache.data[:, :, 1, :, :4], saved_b)


@pytest.mark.parametrize("device", DEVICES)
def test_host_tier_alone_defers_its_blocks_and_evicts_to_disk(device, tmp_path):
    """The host tier without a device tier: a deferred restore leaves its host blocks to the caller
    (take_pending; here copied the way the prefill step does), and blocks evicted from the host
    tier's places reach the disk tier intact although those places are written again at once."""
    from edgellm.engine.kv_cache import LinearKVCache
    from edgellm.engine.kv_store import KVReuseStats, TieredKVStore
    from edgellm.kernels import ops

    cache = LinearKVCache(num_layers=2, max_batch_size=2, num_kv_heads=2, capacity=64, head_dim=4,
                          dtype=torch.float32, device=torch.device(device))
    block = 2 * 2 * 2 * 4 * 4 * 4
    store = TieredKVStore(cache, KVReuseSettings(gpu_bytes=0, host_bytes=3 * block, disk_dir=tmp_path, block_tokens=4),
                          "m")
    assert store.gpu is None and store.host.data.is_pinned() == (device == "cuda")
    c, d = list(range(300, 313)), list(range(400, 413))  # three whole blocks each, and one token
    cache.data.normal_()
    saved_c = cache.data[:, :, 0, :, :12].clone()
    stats = KVReuseStats()
    store.save(0, store.keys(c, ""), stats)
    assert stats.stored_blocks == 3
    cache.data[:, :, 1].zero_()
    hits = KVReuseStats()
    assert store.restore(1, len(c), store.keys(c, ""), hits, defer=True) == 12 and hits.hits_host == 3
    assert not cache.data[:, :, 1].any()  # deferred: nothing copied yet
    pool_blocks, host_blocks = store.take_pending()
    assert pool_blocks == [] and [(p, s) for _, p, s in host_blocks] == [(0, 1), (1, 1), (2, 1)]
    ops.blocks_to_slot(store.host.data, cache.data, store._table(host_blocks))
    assert torch.equal(cache.data[:, :, 1, :, :12], saved_c)
    cache.data[:, :, 0].normal_()
    store.save(0, store.keys(d, ""), KVReuseStats())  # c's three places now hold d's blocks
    store.flush()
    cache.data[:, :, 1].zero_()
    again = KVReuseStats()
    assert store.restore(1, len(c), store.keys(c, ""), again) == 12 and again.hits_disk == 3
    assert torch.equal(cache.data[:, :, 1, :, :12], saved_c)


@pytest.mark.parametrize("settings", [dict(gpu_bytes=-1), dict(block_tokens=0), dict(gpu_bytes=0),
                                      dict(host_bytes=1.5)])
def test_bad_settings_are_rejected(tiny_models, settings):
    with pytest.raises(ConfigurationError):
        LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", kv_reuse=KVReuseSettings(**settings))


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_kv_reuse_through_every_tier_on_gpu(tiny_models, tmp_path):
    """The KV store on CUDA (side-stream host copies, pinned memory, disk): prompts A, B, A, B with a
    device tier of one prompt, a host tier and a disk directory; then a fresh runtime on the same
    directory. Every answer equals the no-reuse run's."""
    from edgellm import KVReuseSettings

    model_dir, _ = tiny_models["llama"]
    a = [1] + [(5 * i) % 80 + 7 for i in range(32)]
    b = [1] + [(3 * i) % 70 + 9 for i in range(32)]
    plain = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32")

    def run(runtime, prompt):
        return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=8,
                                                           temperature=0))

    expected = {tuple(p): run(plain, p).output_ids for p in (a, b)}
    cache = plain.runner.kv_cache.data
    block = cache[:, :, 0, :, :8].numel() * cache.element_size()
    settings = KVReuseSettings(gpu_bytes=4 * block, host_bytes=16 * block, disk_dir=tmp_path, block_tokens=8)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", kv_reuse=settings)
    with forbid_reference_on_cuda():
        responses = [run(runtime, p) for p in (a, b, a, b)]
    runtime.close()
    assert [r.kv_reuse.hits_host for r in responses] == [0, 0, 4, 4]
    assert all(r.output_ids == expected[tuple(p)] for r, p in zip(responses, (a, b, a, b)))
    fresh = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32",
                                kv_reuse=KVReuseSettings(gpu_bytes=4 * block, disk_dir=tmp_path, block_tokens=8))
    again = run(fresh, a)
    assert again.kv_reuse.hits_disk == 4 and again.output_ids == expected[tuple(a)]


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["gpu", "host"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_memory_tier_hits_copied_inside_the_prefill_graph(tiny_models, chunk, tier):
    """Device-tier (or host-tier) KV hits leave their blocks to the prefill graph
    (runner.attach_block_pools; the host tier's read from pinned memory layer by layer on a side
    stream): a batch of three prompts sharing a 40-token prefix, each row's blocks into its own slot,
    then the same with other tails and rows in another order; chunked (16-token chunks: the table
    rides the first only) or not. Every answer equals the no-reuse run's, under graphs, and the hits
    were hits of that tier."""
    from edgellm import KVReuseSettings

    model_dir, _ = tiny_models["llama"]
    system = [1] + [(7 * i) % 90 + 5 for i in range(39)]
    batches = [[system + [11, 23, 35], system[:24] + [12, 44], system + [12, 44, 56, 3]],
               [system[:33] + [60, 61], system + [9] * 6, system + [11, 23, 35, 36]]]
    plain = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", max_batch_size=3,
                                prefill_chunk_size=chunk)
    settings = KVReuseSettings(gpu_bytes=1 << 20, block_tokens=8) if tier == "gpu" else \
        KVReuseSettings(gpu_bytes=0, host_bytes=1 << 20, block_tokens=8)
    reuse = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", max_batch_size=3, prefill_chunk_size=chunk,
                                kv_reuse=settings)
    assert (reuse.runner.block_pool if tier == "gpu" else reuse.runner.host_block_pool) is not None

    def run(runtime, prompts):
        return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                           max_generate_length=6, temperature=0))

    with forbid_reference_on_cuda():
        run(reuse, [system + [2]])  # saves the prefix's five blocks
        for prompts in batches:
            got = run(reuse, prompts)
            assert got.output_ids == run(plain, prompts).output_ids
            hits = got.kv_reuse.hits_gpu if tier == "gpu" else got.kv_reuse.hits_host
            assert hits == got.kv_reuse.reused_blocks > 0
    sources = {k.source for k in reuse.runner.graphs.graphs if isinstance(k, PrefillKey)}
    assert sources == ({"ids"} if tier == "gpu" else {"ids", "ids + host blocks"})
