"""A runtime over a reduced vocabulary (issue 15): the LM head keeps the map's rows, sampling runs on
reduced ids and the remap kernel turns them back into full ids. Checked against the full-vocabulary
runtime (float32, CPU): a map built from the model's own answers gives the same greedy tokens and the
same logits in the kept columns; a map without the full argmax still yields tokens of the map only;
speculation, streaming, stop strings and KV reuse keep working; bad maps fail at load."""

import json
import shutil

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime, SpeculativeConfig
from edgellm.engine.kv_store import KVReuseSettings
from edgellm.engine.vocab_map import save_vocab_map
from edgellm.errors import ConfigurationError, VocabMapError
from edgellm.vocab import reduce_vocab

PROMPTS = ["w5 w6 w7", "w10 w11 w12 w13", "w20 w21 w20 w21 w20"]
NEW = 10


def items(prompts=PROMPTS):
    return [{"messages": [{"role": "user", "content": p}]} for p in prompts]


def run(runtime, batch, new=NEW, **kwargs):
    return runtime.handle_request(LLMGenerationRequest(requests=batch, max_generate_length=new, temperature=0, **kwargs))


def self_map(model_dir, tmp_path, prompts=PROMPTS, size=40, new=NEW):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(item) + "\n" for item in items(prompts)))
    reduce_vocab(model_dir, corpus, size, "self", output=tmp_path / "map", max_new_tokens=new, device="cpu",
                 tolerance=0)
    return tmp_path / "map"


@pytest.mark.slow
# llama through the kernels; qwen2 (tied embeddings: the reduced head is cut from the embedding) on references.
@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.reference_ops)])
def test_self_map_gives_the_full_vocabulary_tokens(tiny_models, tmp_path, family):
    model_dir = tiny_models[family][0]
    full = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)
    reduced = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False,
                                  reduced_vocab_dir=self_map(model_dir, tmp_path))
    assert reduced.config.reduced_vocab_size == 40 and reduced.runner.weights.lm_head.shape[0] == 40
    assert run(reduced, items()).output_ids == run(full, items()).output_ids
    # The first step's logits: the kept columns of the full logits.
    ids = torch.tensor([full.tokenizer.encode_chat(items()[0]["messages"])])
    with torch.inference_mode():
        ours = reduced.runner.prefill_step(reduced.runner.embed(ids), [ids.shape[1]])
        theirs = full.runner.prefill_step(full.runner.embed(ids), [ids.shape[1]])
    torch.testing.assert_close(ours, theirs[:, reduced.runner.vocab_map.long()], rtol=1e-5, atol=1e-5)


@pytest.mark.reference_ops
def test_default_model_self_map(default_model_dir, tmp_path):
    prompts = ["What is the capital of France?", "Name three colours."]
    full = LLMInferenceRuntime(default_model_dir, device="cpu", cuda_graphs=False, max_batch_size=2)
    path = self_map(default_model_dir, tmp_path, prompts, size=2048, new=12)
    reduced = LLMInferenceRuntime(default_model_dir, device="cpu", cuda_graphs=False, max_batch_size=2,
                                  reduced_vocab_dir=path)
    expected = run(full, items(prompts), new=12)
    got = run(reduced, items(prompts), new=12)
    assert got.output_ids == expected.output_ids and got.output_texts == expected.output_texts


@pytest.mark.reference_ops
def test_a_map_without_the_argmax_still_gives_tokens_of_the_map(tiny_models, tmp_path):
    model_dir = tiny_models["llama"][0]
    full = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)
    first = run(full, items()[:1]).output_ids[0][0]
    keep = {i for i in range(6, 96, 2) if i != first} | {2}  # words and EOS
    save_vocab_map(tmp_path, torch.tensor(sorted(keep)), {})
    reduced = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=tmp_path)
    out = run(reduced, items()[:1])
    kept = set(reduced.runner.vocab_map.tolist())
    assert out.output_ids[0][0] != first and all(t in kept for t in out.output_ids[0])
    assert out.output_texts[0] == reduced.tokenizer.decode(out.output_ids[0])


@pytest.mark.reference_ops
def test_found_in_the_model_directory_and_switched_off(tiny_models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["llama"][0], model_dir)
    save_vocab_map(model_dir, torch.tensor(sorted({*range(0, 96, 3), 2})), {})
    assert LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False).config.reduced_vocab_size == 33
    off = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=False)
    assert off.runner.vocab_map is None and off.config.reduced_vocab_size == 0
    with pytest.raises(ConfigurationError, match="reduced_vocab_dir must be"):
        LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=True)


@pytest.mark.reference_ops
def test_bad_maps_fail_at_load(tiny_models, tmp_path):
    model_dir = tiny_models["llama"][0]
    save_vocab_map(tmp_path / "no_eos", torch.tensor([0, 1, 3, 4]), {})
    with pytest.raises(VocabMapError, match="required token ids missing from the map: \\[2\\]"):
        LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=tmp_path / "no_eos")
    save_vocab_map(tmp_path / "other", torch.tensor([0, 1, 2, 50000]), {})
    with pytest.raises(VocabMapError, match="for this model's vocabulary of 96"):
        LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=tmp_path / "other")
    with pytest.raises(VocabMapError, match="no vocab_map.safetensors"):
        LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=tmp_path / "missing")


@pytest.mark.reference_ops
@pytest.mark.slow
def test_speculation_streaming_stops_and_reuse_with_a_reduced_vocabulary(tiny_models, tmp_path):
    model_dir = tiny_models["llama"][0]
    path = self_map(model_dir, tmp_path, size=48, new=16)
    plain = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=path)
    expected = run(plain, items(), new=16)
    spec = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=path,
                               speculative=SpeculativeConfig(method="ngram", max_verify_tokens=4, adaptive=False))
    assert run(spec, items(), new=16).output_ids == expected.output_ids
    reuse = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, reduced_vocab_dir=path,
                                kv_reuse=KVReuseSettings(block_tokens=4, gpu_bytes=1 << 20))
    run(reuse, items(), new=16)
    again = run(reuse, items(), new=16)
    assert again.output_ids == expected.output_ids and again.kv_reuse.reused_tokens > 0
    pieces = []
    streamed = plain.handle_request(LLMGenerationRequest(requests=items()[:1], max_generate_length=16, temperature=0),
                                    on_text=lambda row, text: pieces.append(text))
    assert "".join(pieces) == streamed.output_texts[0] == expected.output_texts[0]
    words = expected.output_texts[0].split()
    if len(words) > 2:  # a stop string ends the text where it starts
        stopped = run(plain, items()[:1], new=16, stop=[words[2]])
        assert words[2] not in stopped.output_texts[0]


@pytest.mark.reference_ops
def test_cli_info_and_generate_with_a_reduced_vocabulary(tiny_models, tmp_path, capsys):
    from edgellm.cli import main

    model_dir = tiny_models["llama"][0]
    path = self_map(model_dir, tmp_path)
    assert main(["info", str(model_dir), "--reduced-vocab-dir", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reduced_vocab_size           40" in out and "vocab_map.safetensors" in out
    args = ["generate", PROMPTS[0], "-m", str(model_dir), "-n", "6", "-t", "0", "--device", "cpu"]
    assert main(args + ["--reduced-vocab-dir", str(path)]) == 0
    reduced = capsys.readouterr().out
    assert main(args) == 0
    assert reduced == capsys.readouterr().out


@pytest.mark.reference_ops
def test_lora_with_a_reduced_vocabulary(tiny_models, lora_adapters, tmp_path):
    """Adapters change the layers, never the LM head: with the adapter's own answers in the map, the
    reduced runtime gives the full runtime's tokens under the adapter."""
    model_dir = tiny_models["llama"][0]
    adapters = {"a": lora_adapters["a"][0]}
    full = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, lora_weights=adapters)
    expected = run(full, items(), lora_weights_name="a").output_ids
    save_vocab_map(tmp_path, torch.tensor(sorted({0, 1, 2, 3, 4, 5} | {t for ids in expected for t in ids})), {})
    reduced = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, lora_weights=adapters,
                                  reduced_vocab_dir=tmp_path)
    assert run(reduced, items(), lora_weights_name="a").output_ids == expected
