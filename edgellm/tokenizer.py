"""Text <-> token ids with HF `tokenizers`, and chat templates rendered with jinja2.

Reads tokenizer.json and tokenizer_config.json (special tokens, chat template); the template may
also live in chat_template.jinja, as current transformers writes it. Templates render the way
transformers renders them (sandboxed jinja2, trim_blocks, lstrip_blocks, loop controls, tojson,
raise_exception, strftime_now), so prompts are token-identical to `apply_chat_template`.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from .errors import TokenizerError, read_json

ROLES = ("system", "user", "assistant", "tool")


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE writes bytes as: printable bytes stand for themselves, the
    others (controls, space, DEL, the non-printing Latin-1 range) take code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: str | None):
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_text(config.get(key)) is not None
        }

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir} has no tokenizer.json; text prompts need one "
                                 "(requests with input_ids work without it)")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise TokenizerError(f"cannot read {path}: {exc}") from exc
        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path, TokenizerError) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def added_token_ids(self, special_only: bool = False) -> list[int]:
        """Ids of the tokenizer's added tokens (all, or the ones marked special)."""
        return sorted(i for i, token in self._tok.get_added_tokens_decoder().items()
                      if token.special or not special_only)

    def vocab(self) -> dict[str, int]:
        """Every token string and its id (added tokens included)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer's tokenizer.json as the tokenizers library serializes it (its model, normalizer,
        pre-tokenizer and decoder: how token strings spell text)."""
        return self._tok.to_str()

    def byte_token_ids(self) -> list[int]:
        """The tokens that can spell any text byte by byte: byte-level BPE's 256-character alphabet
        (GPT-2 style tokenizers), or SentencePiece's `<0x00>`..`<0xFF>` byte fallback."""
        vocab = self.vocab()
        found = {vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}
        if '"ByteLevel"' in self._tok.to_str():
            found.update(vocab[c] for c in _byte_level_alphabet() if c in vocab)
        return sorted(found)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.special_tokens.get("eos_token")
        token_id = self.token_to_id(eos) if eos else None
        return () if token_id is None else (token_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The chat template's text; tools: OpenAI function definitions, as transformers passes them."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                                 "send `prompt` (raw text) or `input_ids` instead of `messages`")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=None,
                **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise TokenizerError(f"the model's chat template rejected the messages: {exc}") from exc

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Chat messages -> prompt ids, as transformers' apply_chat_template(tokenize=True) gives them:
        the template already writes any BOS, so no special tokens are added on top."""
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)

