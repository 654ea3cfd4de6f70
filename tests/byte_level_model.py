"""A tiny random Llama whose tokenizer is byte-level BPE (every text spellable, as real models' are):
for the structured-output tests, where a grammar's text must be writable token by token."""

import json
from pathlib import Path

import torch

SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]


# A chat template in Qwen2.5's manner: the tools listed in the system turn, calls as <tool_call> JSON blocks.
TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>You may call functions.<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.{% endif %}"
    "{%- for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{%- for c in m.get('tool_calls', []) %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{%- endfor %}<|assistant|>")


def byte_level_model(model_dir: Path, chat_template: str | None = None) -> None:
    """A Llama of random weights whose tokenizer is byte-level BPE: the 256 byte characters, a few
    merges, then the special tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("\"", ":"), ("Ġ", "\""), ("t", "r"), ("tr", "u"), ("tru", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": chat_template or
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"}))
    config = transformers.LlamaConfig(vocab_size=len(vocab) + 3, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], initializer_range=0.2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(model_dir)
