"""The `edgellm` command line on a tiny model (the default-model CLI check is in test_default_model)."""

import json

import pytest

from edgellm.cli import main

pytestmark = pytest.mark.reference_ops  # host logic (conftest.py)


def test_run_json_batches(llama_dir, tmp_path, capsys):
    spec = {"max_generate_length": 6, "temperature": 0, "batch_size": 2,
            "requests": [{"prompt": "w1 w2"}, {"messages": [{"role": "user", "content": "w3"}]},
                         {"input_ids": [1, 5, 6]}]}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    code = main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "-m", str(llama_dir),
                 "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["request_index"] for r in result["responses"]] == [0, 1, 2]
    assert all(r["finish_reason"] in ("stop", "length") and r["output_ids"] for r in result["responses"])
    assert [b["size"] for b in result["batches"]] == [2, 1]


def test_run_reports_bad_items_and_continues(llama_dir, tmp_path):
    spec = {"max_generate_length": 4, "temperature": 0, "batch_size": 1,
            "requests": [{"prompt": "w1"}, {"messages": [{"role": "wizard", "content": "w3"}]}]}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    code = main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "-m", str(llama_dir)])
    result = json.loads((tmp_path / "out.json").read_text())
    assert code == 1
    assert "output_text" in result["responses"][0]
    assert "unknown role 'wizard'" in result["responses"][1]["error"]


def test_generate_and_info(llama_dir, capsys):
    assert main(["generate", "w4 w5", "-m", str(llama_dir), "-n", "4", "--timings"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "prefill" in out.err
    assert main(["info", str(llama_dir)]) == 0
    assert "num_kv_heads                 2" in capsys.readouterr().out


def test_quantization_options(llama_dir, capsys):
    """--quantization loads packed weights (the same tokens as the API's), info shows what they take."""
    from edgellm import LLMGenerationRequest, LLMInferenceRuntime

    assert main(["info", str(llama_dir), "--device", "cpu"]) == 0
    full = capsys.readouterr().out
    assert main(["info", str(llama_dir), "--device", "cpu", "--quantization", "int4"]) == 0
    packed = capsys.readouterr().out
    nbytes = [int(text.split("weights on the device")[1].split()[0].replace(",", "")) for text in (full, packed)]
    assert nbytes[1] < nbytes[0] / 2 and "int4 linear weights" in packed and "quantization                 int4" in packed
    spec = {"max_generate_length": 6, "temperature": 0, "requests": [{"input_ids": [1, 5, 6, 9]}]}
    code = main(["generate", "w4 w5", "-m", str(llama_dir), "-n", "4", "--device", "cpu", "--quantization", "int8",
                 "--raw"])
    assert code == 0 and capsys.readouterr().out.strip()
    runtime = LLMInferenceRuntime(llama_dir, device="cpu", quantization="int8")
    assert runtime.handle_request(LLMGenerationRequest(**spec)).output_ids[0]
    assert main(["info", str(llama_dir), "--quantize-lm-head"]) == 2
    assert "--quantize-lm-head needs --quantization" in capsys.readouterr().err


def test_clear_error_exit_code(tmp_path, capsys):
    assert main(["generate", "hi", "-m", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "hi", "-m", str(tmp_path), "--top-p", "3"]) == 2


def test_run_with_lora_adapters(llama_dir, lora_adapters, tmp_path):
    """--lora loads adapters (the first is active); run files pick one per request or item."""
    from edgellm import LLMGenerationRequest, LLMInferenceRuntime

    spec = {"max_generate_length": 5, "temperature": 0,
            "requests": [{"input_ids": [1, 5, 6]}, {"input_ids": [1, 5, 6], "lora_weights_name": "b"},
                         {"input_ids": [1, 5, 6], "lora_weights_name": ""}]}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    code = main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "-m", str(llama_dir),
                 "--device", "cpu", "--lora", f"a={lora_adapters['a'][0]}", "--lora", f"b={lora_adapters['b'][0]}"])
    assert code == 0
    got = [r["output_ids"] for r in json.loads((tmp_path / "out.json").read_text())["responses"]]
    runtime = LLMInferenceRuntime(llama_dir, device="cpu", lora_weights={n: p for n, (p, _) in lora_adapters.items()})
    expected = runtime.handle_request(LLMGenerationRequest(
        requests=[{"input_ids": [1, 5, 6], "lora_weights_name": n} for n in ("a", "b", "")],
        max_generate_length=5, temperature=0)).output_ids
    assert got == expected
    assert main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "x.json"), "-m", str(llama_dir),
                 "--lora", "nopath"]) == 2


def test_run_reuses_kv_saved_on_disk_by_an_earlier_run(llama_dir, tmp_path):
    """--kv-disk-dir: a second `edgellm run` finds the first one's saved prefix and answers the same."""
    spec = {"max_generate_length": 3, "temperature": 0, "requests": [{"input_ids": [1, 9, 8, 7, 6, 5, 4, 3, 2, 11]}]}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    args = ["-m", str(llama_dir), "--device", "cpu", "--kv-disk-dir", str(tmp_path / "kv"), "--kv-gpu-mb", "0",
            "--kv-block-tokens", "4"]
    outputs = []
    for name in ("first.json", "second.json"):
        assert main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / name), *args]) == 0
        outputs.append(json.loads((tmp_path / name).read_text()))
    assert outputs[0]["batches"][0]["kv_reuse"]["stored_blocks"] == 2
    assert outputs[1]["batches"][0]["kv_reuse"]["hits_disk"] == 2
    assert outputs[0]["responses"][0]["output_ids"] == outputs[1]["responses"][0]["output_ids"]


@pytest.mark.slow
def test_generate_with_speculation_prints_the_same_answer_and_its_statistics(llama_dir, capsys):
    base = ["generate", "w5 w6 w7 w5 w6 w7 w5 w6", "-m", str(llama_dir), "-n", "12", "--raw", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "ngram", "--show-accepted"]) == 0
    out = capsys.readouterr()
    assert out.out == plain  # not a terminal: no colour codes
    assert "[speculative: accepted" in out.err and "tokens per step" in out.err
    assert main(base + ["--draft-model", str(llama_dir), "--num-speculative-tokens", "3", "--timings"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "[speculative: accepted" in out.err
    assert main(base + ["--speculative", "draft"]) == 2
    assert "needs draft_model" in capsys.readouterr().err


def test_accepted_spans_colour_the_accepted_tokens(llama_dir):
    from edgellm.cli import accepted_spans
    from edgellm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(llama_dir)
    ids = tokenizer.encode("w5 w6 w7 w8")
    text = tokenizer.decode(ids)
    coloured = accepted_spans(tokenizer, ids, [False, True, True, False], text, colour=True)
    assert coloured.replace("\033[1;32m", "").replace("\033[0m", "") == text
    assert coloured.count("\033[1;32m") == 2
    assert any(f"\033[1;32m{piece}\033[0m" in coloured for piece in (" w6", "w6 ", "w6"))
    assert accepted_spans(tokenizer, ids, [True] * 4, text[:5], colour=False) == text[:5]


def test_progress_bars_only_where_someone_watches(monkeypatch, capsys):
    """tqdm bars on a terminal's stderr; nothing when stderr is not a terminal or EDGELLM_QUIET=1."""
    import sys

    from edgellm.progress import progress

    def bar():
        for _ in progress(range(3), desc="counting sheep"):
            pass
        return capsys.readouterr().err

    assert "counting sheep" not in bar()  # pytest's captured stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert "counting sheep" in bar()
    monkeypatch.setenv("EDGELLM_QUIET", "1")
    assert "counting sheep" not in bar()
