"""Tokenizer and chat templates against transformers' AutoTokenizer on the same files."""

import json

import pytest

from edgellm.errors import TokenizerError
from edgellm.tokenizer import Tokenizer

from conftest import write_tokenizer

MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"},
            {"role": "assistant", "content": "w6"}, {"role": "user", "content": "w7"}]


def _hf(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_chat_template_matches_transformers(tmp_path):
    write_tokenizer(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), _hf(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                        tokenize=False)
    assert ours.encode_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                tokenize=True, return_dict=False)


def test_chat_template_from_jinja_file(tmp_path):
    write_tokenizer(tmp_path, chat_template=None)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                                  "{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES[:2]) == "[system]w1 w2[user]w3 w4 w5"


def test_named_template_list_uses_default(tmp_path):
    write_tokenizer(tmp_path, chat_template=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "PLAIN"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES) == "PLAIN"


def test_default_model_tokenizer_matches_transformers(default_model_dir):
    ours, hf = Tokenizer.from_dir(default_model_dir), _hf(default_model_dir)
    for text in ["Hello world!", "The year 2024 had 366 days.", "  spaces\tand\nnewlines ", "Ünïcödé ☃ 東京"]:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    # Digits are split one by one, as SmolLM2's pre-tokenizer does.
    assert len(ours.encode("12345")) == 5


def test_missing_template_and_tokenizer_errors(tmp_path):
    write_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_template_raise_exception_becomes_tokenizer_error(tmp_path):
    write_tokenizer(tmp_path, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)

