"""Tokenizers: load a `tokenizer.json`, train a byte-level BPE, fingerprint, encode and decode.

A thin layer over Hugging Face `tokenizers` (Rust, parallel). Our one special token is
`<|endoftext|>`, GPT-2's document separator, which ends every document and every response.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmstages.errors import UserError

EOT = "<|endoftext|>"


TOKENIZER_CONFIG = "tokenizer_config.json"


def special_token(config: dict, key: str) -> str | None:
    """A special token of a Hugging Face tokenizer_config.json: a string, or {"content": ...}."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A loaded tokenizer with the end-of-text id and a fingerprint of its exact definition.

    `config` is a Hugging Face `tokenizer_config.json` when the tokenizer came with one (models loaded
    with hf:, and their fine-tuned checkpoints, which keep it beside tokenizer.json): its `eos_token`
    is our end-of-text token (SmolLM2's and Qwen2's `<|endoftext|>`, Llama 3's `<|end_of_text|>`,
    an instruct model's end of turn), and its `chat_template` the model's own prompt format.
    """

    def __init__(self, inner: HFTokenizer, config: dict | None = None):
        inner.no_truncation()  # GPT-2's published tokenizer.json carries max_length 50; we never truncate here
        inner.no_padding()
        self.inner = inner
        self.config: dict = dict(config or {})
        self.eot: str = special_token(self.config, "eos_token") or EOT
        eot = inner.token_to_id(self.eot)
        if eot is None:
            raise UserError(f"the tokenizer has no {self.eot} token",
                            hint="train one with data.tokenizer=train, or add the special token")
        self.eot_id: int = eot

    def with_eot(self, token: str) -> "Tokenizer":
        """The same tokenizer with `token` as its end-of-text (e.g. a chat template's end of turn)."""
        return Tokenizer(self.inner, dict(self.config, eos_token=token))

    @property
    def lowercases(self) -> bool:
        """Whether the tokenizer lowercases text before splitting it (a Lowercase normalizer, alone or in a
        Sequence, or a BERT normalizer with lowercase on)."""
        return _lowercases(json.loads(self.to_str()).get("normalizer"))

    def lowercased(self) -> "Tokenizer":
        """The same vocabulary and merges with a Lowercase normalizer after any normalizer it has: every text
        is lowercased before it is split, here and wherever the tokenizer.json is loaded (data.lowercase)."""
        if self.lowercases:
            return self
        inner = HFTokenizer.from_str(self.to_str())
        lower = normalizers.Lowercase()
        inner.normalizer = normalizers.Sequence([inner.normalizer, lower]) if inner.normalizer else lower
        return Tokenizer(inner, self.config)

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if its tokenizer_config.json has one."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # the list form: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (or a folder holding one, or vocab.json + merges.txt)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        config = read_tokenizer_config(folder / TOKENIZER_CONFIG)
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
                return cls(gpt2_style_from_vocab_merges(path / "vocab.json", path / "merges.txt"), config)
            else:
                raise UserError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this folder")
        if not path.exists():
            raise UserError(f"{path}: tokenizer file not found")
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exception with a parse message
            raise UserError(f"{path}: not a valid tokenizer.json ({err})") from None
        return cls(inner, config)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def to_str(self) -> str:
        return self.inner.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, and beside it the tokenizer_config.json it came with (if any)."""
        Path(path).write_text(self.to_str(), encoding="utf-8")
        if self.config:
            (Path(path).parent / TOKENIZER_CONFIG).write_text(json.dumps(self.config, indent=2, ensure_ascii=False),
                                                              encoding="utf-8")

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the vocabulary, merges and special tokens.

        Computed from the model and added tokens, not the whole JSON, so a cleared truncation setting
        or a different JSON layout of the same tokenizer gives the same fingerprint.
        """
        data = json.loads(self.to_str())
        core = {"model": data.get("model"), "added": [t.get("content") for t in data.get("added_tokens") or []],
                "pre": data.get("pre_tokenizer"), "norm": data.get("normalizer")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust over all cores)."""
        return [e.ids for e in self.inner.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special)


def _lowercases(normalizer: dict | None) -> bool:
    """Whether a tokenizer.json "normalizer" entry lowercases."""
    if not isinstance(normalizer, dict):
        return False
    kind = normalizer.get("type")
    if kind == "Sequence":
        return any(_lowercases(n) for n in normalizer.get("normalizers") or [])
    return kind == "Lowercase" or (kind == "BertNormalizer" and bool(normalizer.get("lowercase")))


def read_tokenizer_config(path: Path) -> dict:
    """A tokenizer_config.json as a dict ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (special tokens count 0), for bits-per-byte.

    Byte-level BPE tokens are strings over GPT-2's printable stand-ins for the 256 bytes; mapping
    them back gives each token's exact byte count, even for tokens that hold part of a character.
    """
    to_byte = {ch: b for b, ch in enumerate(_byte_alphabet())}
    special = {t.content for t in tokenizer.inner.get_added_tokens_decoder().values() if t.special}
    lengths = []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.inner.id_to_token(i)
        if token is None or token in special:
            lengths.append(0)
        elif all(ch in to_byte for ch in token):
            lengths.append(len(token))
        else:  # not a byte-level token (another tokenizer family): fall back to decoding it
            lengths.append(len(tokenizer.decode([i]).encode("utf-8")))
    return lengths


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: printable characters standing for bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_bpe() -> HFTokenizer:
    """An empty byte-level BPE laid out like GPT-2's: every byte is a symbol, so no text is unknown."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterator[str] | Iterable[str], vocab_size: int, *, length: int | None = None,
              lowercase: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (the 256 bytes, merges, and <|endoftext|>);
    `lowercase`: lowercase the text before it is split, in training and in every later use."""
    tok = byte_level_bpe()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(tok)


def gpt2_style_from_vocab_merges(vocab: Path, merges: Path) -> HFTokenizer:
    """GPT-2's two-file format (vocab.json + merges.txt) as a byte-level BPE tokenizer."""
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(EOT) is not None:
        tok.add_special_tokens([EOT])
    return tok


class StreamDecoder:
    """Turns generated token ids into text pieces as they arrive, holding back incomplete UTF-8.

    Byte-level BPE splits multi-byte characters across tokens; decoding a prefix can end in U+FFFD.
    We decode the whole sequence each time and emit only the new, complete part.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
