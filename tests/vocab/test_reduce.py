"""Vocabulary reduction's tool (edgellm/vocab, engine/vocab_map.py): corpora, the three methods on a
small corpus shipped in tests/data/vocab, the ids every map keeps, the map file and its checks, the CLI."""

import json
from pathlib import Path

import pytest
import torch

from edgellm.engine.vocab_map import check_vocab_map, load_vocab_map, save_vocab_map
from edgellm.errors import ConfigurationError, CorpusError, VocabMapError
from edgellm.tokenizer import Tokenizer
from edgellm.vocab import reduce_vocab
from edgellm.vocab.corpus import read_corpus
from edgellm.vocab.select import choose, rank_frequency, rank_input_aware, required_ids

pytestmark = pytest.mark.reference_ops  # host logic (conftest.py)

DATA = Path(__file__).parents[1] / "data" / "vocab"
CORPUS = DATA / "vocab_corpus.jsonl"


def test_corpus_formats(tmp_path):
    samples = read_corpus(CORPUS)
    assert len(samples) == 5
    assert samples[0].input[-1]["content"].startswith("What voltage") and samples[0].response.endswith("48 volts.")
    assert samples[2].input.startswith("Summarise") and samples[2].response.startswith("The lidar")
    assert samples[4].text.startswith("Orion rover manual") and samples[4].response is None
    assert [s.text for s in read_corpus(DATA / "vocab_corpus.txt")][1].startswith("Battery voltage")
    assert len(read_corpus(DATA)) == 7  # a directory: both files, in name order
    assert len(read_corpus(DATA, max_samples=3)) == 3
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not a JSON line"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "odd.jsonl").write_text('{"title": "no usable field"}\n')
    with pytest.raises(CorpusError, match="expected a `text`, `messages` or `prompt`"):
        read_corpus(tmp_path / "odd.jsonl")
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="no samples"):
        read_corpus(tmp_path / "empty.txt")


def test_input_aware_ranks_copied_tokens_first():
    inputs = [[1, 2, 3], [4, 5]]
    responses = [[9, 9, 9, 3, 2], [5, 7, 7]]
    # 2, 3 and 5 occur in their own inputs; 9 is the most frequent response token but never copied.
    assert rank_input_aware(inputs, responses)[:3] == [2, 3, 5]
    assert rank_frequency(inputs, responses) == [9, 2, 3, 5, 7, 1, 4]  # count, then the lower id
    assert choose([5, 3], {0}, 6, 10, tolerance=0.5) == [0, 2, 3, 4, 5, 6]  # band: neighbours of 5 and 3
    assert choose([], {7}, 3, 10) == [0, 1, 7]  # a small corpus: the lowest ids fill the budget


@pytest.mark.parametrize("method", ["frequency", "input_aware"])
def test_maps_from_the_shipped_corpus(default_model_dir, tmp_path, method):
    tok = Tokenizer.from_dir(default_model_dir)
    first = reduce_vocab(default_model_dir, CORPUS, 1000, method, output=tmp_path / method)
    again = reduce_vocab(default_model_dir, CORPUS, 1000, method)
    ids = first.vocab_map
    assert torch.equal(ids, again.vocab_map) and ids.dtype == torch.int32 and ids.numel() == 1000
    assert bool((ids[1:] > ids[:-1]).all())
    kept = set(ids.tolist())
    assert set(tok.added_token_ids()) <= kept and set(tok.byte_token_ids()) <= kept
    assert set(tok.encode_chat([{"role": "user", "content": "x"}])) - set(tok.encode("x", False)) <= kept
    for token in tok.encode("The Orion rover battery runs at 48 volts.", add_special_tokens=False):
        assert token in kept  # a response of the corpus
    info = json.loads((tmp_path / method / "reduced_vocab.json").read_text())
    assert info["reduced_vocab_size"] == 1000 and info["vocab_size"] == 49152 and info["method"] == method
    assert info["tokens_covered_percent"] == 100.0 and len(info["corpus_digest"]) == 32
    assert torch.equal(load_vocab_map(tmp_path / method, 49152, [2]), ids)


def test_input_aware_prefers_what_responses_copy(default_model_dir):
    """With a budget too small for every corpus token, input_aware keeps the tokens the responses
    take from their inputs, where frequency keeps the ones used most."""
    tok = Tokenizer.from_dir(default_model_dir)
    small = len(required_ids(tok, [2], 49152)) + 12
    aware = set(reduce_vocab(default_model_dir, CORPUS, small, "input_aware", tolerance=0).vocab_map.tolist())
    frequent = set(reduce_vocab(default_model_dir, CORPUS, small, "frequency").vocab_map.tolist())
    copied = set(tok.encode(" times highest motor", add_special_tokens=False))  # answers repeat their questions
    assert copied <= aware and not copied & frequent


def test_bad_sizes_and_methods(default_model_dir):
    with pytest.raises(ConfigurationError, match="larger than the model's vocabulary of 49152"):
        reduce_vocab(default_model_dir, CORPUS, 50000)
    with pytest.raises(ConfigurationError, match="below the .* tokens every map keeps"):
        reduce_vocab(default_model_dir, CORPUS, 10)
    with pytest.raises(ConfigurationError, match="unknown vocabulary reduction method"):
        reduce_vocab(default_model_dir, CORPUS, 1000, "magic")


def test_vocab_map_checks(tmp_path):
    good = torch.tensor([0, 2, 5, 9])
    assert check_vocab_map(good, 10, [2]).dtype == torch.int32
    cases = [(torch.tensor([0, 2, 10]), "must lie in \\[0, 10\\)"), (torch.tensor([-1, 2]), "must lie in"),
             (torch.tensor([0, 2, 2, 5]), "id 2 appears more than once"), (torch.tensor([0, 5, 2]), "ascending"),
             (torch.tensor([0, 1, 5]), "required token ids missing from the map: \\[2\\]"),
             (torch.tensor([[0, 2]]), "1-D integer"), (torch.tensor([0.0, 2.0]), "1-D integer")]
    for ids, message in cases:
        with pytest.raises(VocabMapError, match=message):
            check_vocab_map(ids, 10, [2])
    save_vocab_map(tmp_path, good, {"note": "test"})
    assert load_vocab_map(tmp_path, 10, [2]).tolist() == [0, 2, 5, 9]
    with pytest.raises(VocabMapError, match="must lie in \\[0, 8\\)"):  # a map of another vocabulary
        load_vocab_map(tmp_path / "vocab_map.safetensors", 8)
    from safetensors.torch import save_file
    save_file({"other": good}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(VocabMapError, match="no tensor named `vocab_map`"):
        load_vocab_map(tmp_path / "wrong.safetensors", 10)
    with pytest.raises(VocabMapError, match="no vocab_map.safetensors"):
        load_vocab_map(tmp_path / "nowhere", 10)


def test_self_method_keeps_what_the_model_says(tiny_models, tmp_path):
    """method self: the model answers the corpus inputs; every token it produced is in the map."""
    from edgellm import LLMGenerationRequest, LLMInferenceRuntime

    model_dir = tiny_models["llama"][0]
    corpus = tmp_path / "c.jsonl"
    prompts = ["w5 w6 w7", "w10 w11", "w20 w21 w22 w23"]
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    result = reduce_vocab(model_dir, corpus, 40, "self", max_new_tokens=6, batch_size=2, device="cpu", tolerance=0)
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)
    said = runtime.handle_request(LLMGenerationRequest(
        requests=[{"messages": [{"role": "user", "content": p}]} for p in prompts], max_generate_length=6,
        temperature=0)).output_ids
    kept = set(result.vocab_map.tolist())
    assert all(t in kept for ids in said for t in ids)
    assert {0, 1, 2, 3, 4, 5} <= kept  # the specials


def test_cli_reduce_vocab(default_model_dir, tmp_path, capsys):
    from edgellm.cli import main

    assert main(["reduce-vocab", "-m", str(default_model_dir), "--corpus", str(DATA), "--size", "800",
                 "--method", "frequency", "-o", str(tmp_path / "map")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["reduced_vocab_size"] == 800 and "wrote" in out.err
    assert (tmp_path / "map" / "vocab_map.safetensors").is_file()
    assert main(["reduce-vocab", "-m", str(default_model_dir), "--corpus", str(tmp_path / "none.txt"), "--size",
                 "800", "-o", str(tmp_path / "x")]) == 2
    assert "corpus not found" in capsys.readouterr().err


def test_self_method_on_the_shipped_corpus(default_model_dir):
    """method self with the default model on the shipped corpus: the same map twice, the required
    tokens in it, and every token of the model's own answers covered."""
    tok = Tokenizer.from_dir(default_model_dir)
    kwargs = dict(max_samples=4, max_new_tokens=16, batch_size=4, device="cpu")
    first = reduce_vocab(default_model_dir, CORPUS, 1000, "self", **kwargs)
    again = reduce_vocab(default_model_dir, CORPUS, 1000, "self", **kwargs)
    assert torch.equal(first.vocab_map, again.vocab_map)
    assert set(required_ids(tok, [2], 49152)) <= set(first.vocab_map.tolist())
    assert first.info["method"] == "self" and first.info["tokens_covered_percent"] == 100.0
