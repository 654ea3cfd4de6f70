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


def test_progress_on_a_terminal_in_a_pipe_and_quiet(monkeypatch, capsys):
    """A tqdm bar on a terminal's stderr; elsewhere plain lines with done/total and the rate, at most one
    every PLAIN_EVERY_S (short work: none); nothing at all with EDGELLM_QUIET=1."""
    import sys

    from edgellm import progress as progress_module
    from edgellm.progress import progress

    def bar():
        assert [i for i in progress(range(3), desc="counting sheep", unit="sheep")] == [0, 1, 2]
        return capsys.readouterr().err

    assert bar() == ""  # pytest's captured stderr is no terminal, and the work was short
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    lines = bar().splitlines()
    assert lines[0].startswith("counting sheep: 1/3 sheeps (") and "sheep/s" in lines[0]
    assert len(lines) == 4 and lines[-1].startswith("counting sheep: 3/3 sheeps done in")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert "counting sheep" in bar() and "\r" in capsys.readouterr().err + bar()  # tqdm's bar
    monkeypatch.setenv("EDGELLM_QUIET", "1")
    assert bar() == ""


def _concatenating_model(llama_dir, tmp_path):
    """The tiny llama with a chat template that adds strings, as real ones do (SmolLM2's)."""
    import shutil

    from conftest import write_tokenizer

    model_dir = tmp_path / "concat"
    shutil.copytree(llama_dir, model_dir)
    write_tokenizer(model_dir, chat_template=(
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"))
    return model_dir


def test_an_image_for_a_text_model_is_refused_before_its_chat_template(llama_dir, tmp_path, capsys):
    from PIL import Image

    from edgellm import LLMGenerationRequest, LLMInferenceRuntime
    from edgellm.errors import InvalidRequestError

    model_dir = _concatenating_model(llama_dir, tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    assert main(["generate", "--image", str(tmp_path / "img.png"), "w1 w2", "-m", str(model_dir)]) == 2
    assert "text-only and takes no images" in capsys.readouterr().err
    runtime = LLMInferenceRuntime(model_dir, device="cpu")
    image = {"type": "image", "image": str(tmp_path / "img.png")}
    with pytest.raises(InvalidRequestError, match="request item 1: .* text-only"):
        runtime.handle_request(LLMGenerationRequest(requests=[
            {"prompt": "w1"}, {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "w1"}]}]}]))
    # Text parts alone are the text, joined by newlines, for a template that expects strings.
    parts = [{"type": "text", "text": "w1 w2"}, {"type": "text", "text": "w3"}]
    as_parts, as_text = (runtime.handle_request(LLMGenerationRequest(
        requests=[{"messages": [{"role": "user", "content": content}]}], max_generate_length=4, temperature=0))
        for content in (parts, "w1 w2\nw3"))
    assert as_parts.output_ids == as_text.output_ids and as_parts.prompt_lengths == as_text.prompt_lengths


def test_info_reports_a_quantized_directory_as_stored(llama_dir, tmp_path, capsys):
    assert main(["quantize", str(llama_dir), "--to", "int8", "-o", str(tmp_path / "q8")]) == 0
    capsys.readouterr()
    assert main(["info", "-m", str(tmp_path / "q8"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quantization                 int8" in out and "int8 linear weights" in out
    assert main(["info", str(tmp_path / "q8"), "--quantization", "int4"]) == 2
    assert "already int8" in capsys.readouterr().err


def test_command_line_conventions(llama_dir, tmp_path, monkeypatch, capsys):
    """--version, -q on either side of the command, -m everywhere, "-" for stdin, --json, --no-stream,
    an empty prompt refused, help texts that say what the tool does."""
    import io
    import sys

    from edgellm import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"edgellm {__version__}"
    model = ["-m", str(llama_dir), "-n", "4", "--device", "cpu"]
    assert main(["generate", "w4 w5", *model]) == 0  # streams by default
    streamed = capsys.readouterr().out
    assert main(["-q", "generate", "w4 w5", "--no-stream", "-q", *model]) == 0
    assert capsys.readouterr().out == streamed
    monkeypatch.setattr(sys, "stdin", io.StringIO("w4 w5"))
    assert main(["generate", "-", "--json", *model]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["output_texts"] == [streamed.rstrip("\n")] and document["finish_reasons"]
    assert main(["generate", "  ", *model]) == 2 and "the prompt is empty" in capsys.readouterr().err
    assert main(["info", str(llama_dir), "-m", str(tmp_path)]) == 2
    assert "two model directories" in capsys.readouterr().err
    for command, wanted in (("bench", "% of the bandwidth floor"), ("quantize", "+28% perplexity"),
                            ("chat", "prefill/decode timings")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert wanted in " ".join(text.split()) and "%%" not in text
    for flag in ("--model", "--model-dir", "-m"):  # reduce-vocab takes the model as every command does
        assert main(["reduce-vocab", flag, str(tmp_path / "none"), "--corpus", str(tmp_path), "--size", "8",
                     "-o", str(tmp_path / "out")]) == 2
        assert f"model directory {tmp_path / 'none'} does not exist" in capsys.readouterr().err


def test_chat_commands_answer_at_once(llama_dir, tmp_path, monkeypatch, capsys):
    import builtins

    lines = iter(["w4 w5", "/reset", f"/image {tmp_path / 'missing.png'}", "w6", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(llama_dir), "-n", "3", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr()
    assert "[conversation cleared]" in out.err and "[no image file" in out.err
    answers = [json.loads(line) for line in out.out.splitlines()]
    assert len(answers) == 2 and all(a["prompt_lengths"] for a in answers)
    assert answers[1]["prompt_lengths"][0] < answers[0]["prompt_lengths"][0] + 4  # /reset dropped the first turn


def test_run_items_with_their_own_settings_stdin_stdout_and_labels(llama_dir, monkeypatch, capsys):
    import io
    import sys

    spec = {"max_generate_length": 5, "temperature": 0, "batch_size": 4,
            "requests": [{"input_ids": [1, 5, 6], "max_generate_length": 2}, {"input_ids": [1, 5, 6]},
                         {"input_ids": [1, 500]}, {"input_ids": [1, 5, 6]}]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(spec)))
    assert main(["run", "-i", "-", "-o", "-", "-m", str(llama_dir), "--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert out.out.endswith("}\n") and "1 failed" in out.err
    responses = json.loads(out.out)["responses"]
    assert [r["request_index"] for r in responses] == [0, 1, 2, 3]
    assert len(responses[0]["output_ids"]) == 2 and len(responses[1]["output_ids"]) == 5
    assert responses[1]["output_ids"] == responses[3]["output_ids"]
    assert responses[2]["error"].startswith("request 2: token ids [500]")


def test_run_file_items_with_response_format(llama_dir, tmp_path):
    """`edgellm run` files take response_format per item or for the file (edgellm's choice type here):
    the constrained items' outputs are among the choices, the free one is not held to them."""
    pytest.importorskip("xgrammar")
    choice = {"type": "choice", "choices": ["w3", "w5"]}  # (one token each: this word-level vocabulary has no spaces)
    spec = {"max_generate_length": 8, "temperature": 1.0, "seed": 3, "response_format": choice,
            "requests": [{"prompt": "w1 w2"}, {"prompt": "w9", "seed": 4},
                         {"prompt": "w1 w2", "response_format": {"type": "text"}}]}
    (tmp_path / "in.json").write_text(json.dumps(spec))
    assert main(["run", "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "-m", str(llama_dir)]) == 0
    texts = [r["output_text"] for r in json.loads((tmp_path / "out.json").read_text())["responses"]]
    assert texts[0] in ("w3", "w5") and texts[1] in ("w3", "w5")
    assert texts[2] not in ("w3", "w5")
