"""Shared fixtures: tiny random models of each supported family, built with transformers and saved
as HF directories, and a tiny word-level tokenizer with a chat template. Tests live beside what they
test (tests/engine/test_kv_store.py for edgellm/engine/kv_store.py); helpers several of them use are
modules here (kernel_cases.py, family_models.py, vlm_models.py). Marker `gpu`: the test needs a CUDA GPU
(skipped without one; bench/gpu_check.sh runs them); `slow`: over ~30 s on a 2-core CPU; `reference_ops`:
host logic, run on the ops' torch references (below)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# No GPU (CI): every Triton kernel runs through the interpreter on CPU tensors (DESIGN.md). Must be
# set before edgellm.kernels is imported, since triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_patching

    interpreter_patching.install()

# Three prompts (11, 3 and 7 tokens) of the tiny models' vocabulary.
TINY_PROMPTS = [[1, 17, 33, 8, 61, 40, 9, 22, 5, 71, 12], [1, 50, 6], [1, 90, 14, 27, 3, 88, 44]]
# A test taking `device` from these runs on the CPU (the interpreter there in CI) and, marked gpu, on CUDA.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _reference_ops_for_host_logic(request):
    """Marker `reference_ops`: the test's subject is host logic (requests, errors, the CLI, bookkeeping),
    so its ops (in the test's thread) run their torch references instead of the Triton interpreter,
    which costs about 0.5 s a decode step of a tiny model. The engine passes the same arguments to
    either (kernels/dispatch.py); tests/kernels and the tests left unmarked (transformers comparisons of
    each family, quantized formats, adapters, speculation, vision) run the kernels themselves."""
    if request.node.get_closest_marker("reference_ops") is None:
        yield
        return
    assert request.node.get_closest_marker("gpu") is None, "a gpu test runs the kernels, not reference_ops"
    from edgellm.kernels.dispatch import use_reference

    with use_reference():
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA GPU: skipped where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


VOCAB = 96
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, bos_token_id=1, eos_token_id=2, initializer_range=0.2)

# Family name -> (transformers class names, extra config). Together they cover GQA, Llama-3 rope
# scaling, qkv bias, q/k norm with an explicit head_dim, and tied and untied embeddings.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                            sliding_window=4096)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=12,
                                                       tie_word_embeddings=False)),
}


def write_tokenizer(model_dir: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


def build_model(family: str, model_dir: Path, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (model_dir, transformers model) for every family, built once per test session."""
    built = {}
    for family in FAMILIES:
        model_dir = tmp_path_factory.mktemp(family)
        built[family] = (model_dir, build_model(family, model_dir))
    return built


@pytest.fixture(scope="session")
def llama_dir(tiny_models):
    return tiny_models["llama"][0]


@pytest.fixture(scope="session")
def default_model_dir():
    import edgellm

    return edgellm.default_model_dir()


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (generated ids only)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def assert_rows_match_transformers(response, hf_model, prompts, new_tokens: int) -> None:
    """Each row of a batched response equals transformers' greedy run of that prompt alone."""
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf_model, prompt, new_tokens)
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected, f"row {i} differs from transformers"


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_adapter(model_dir: Path, adapter_dir: Path, *, seed: int, rank: int, alpha: float,
                       targets=ALL_PROJECTIONS, rslora: bool = False):
    """A random PEFT LoRA adapter (A and B both nonzero) saved to adapter_dir; returns the peft
    package's merged-weights model of it: the reference for edgellm's per-row LoRA."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, use_rslora=rslora)
    peft.get_peft_model(base, config).save_pretrained(adapter_dir)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="session")
def lora_adapters(tiny_models, tmp_path_factory):
    """Two adapters of the tiny llama: "a" (rank 4, all seven projections) and "b" (rank 8, q/v/down
    only, rsLoRA scaling): name -> (adapter dir, merged reference model)."""
    model_dir = tiny_models["llama"][0]
    root = tmp_path_factory.mktemp("lora")
    return {
        "a": (root / "a", build_lora_adapter(model_dir, root / "a", seed=1, rank=4, alpha=8.0)),
        "b": (root / "b", build_lora_adapter(model_dir, root / "b", seed=2, rank=8, alpha=4.0,
                                             targets=["q_proj", "v_proj", "down_proj"], rslora=True)),
    }


def random_adapters(model_dir, root):
    """Two random adapters of a tiny model (edgellm.benchmark's): "a" rank 4 on every projection, "b"
    rank 8 on q, v and down: name -> PEFT directory."""
    from edgellm.benchmark import random_lora_dir

    return {"a": random_lora_dir(model_dir, root / "a", rank=4, alpha=8.0, seed=1),
            "b": random_lora_dir(model_dir, root / "b", rank=8, alpha=8.0, seed=2, targets=("q", "v", "down"))}
