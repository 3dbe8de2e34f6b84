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
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmstages.errors import UserError

EOT = "<|endoftext|>"


class Tokenizer:
    """A loaded tokenizer with the end-of-text id and a fingerprint of its exact definition."""

    def __init__(self, inner: HFTokenizer):
        inner.no_truncation()  # GPT-2's published tokenizer.json carries max_length 50; we never truncate here
        inner.no_padding()
        self.inner = inner
        eot = inner.token_to_id(EOT)
        if eot is None:
            raise UserError(f"the tokenizer has no {EOT} token",
                            hint="train one with data.tokenizer=train, or add the special token")
        self.eot_id: int = eot

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (or a folder holding one, or vocab.json + merges.txt)."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
                return cls(gpt2_style_from_vocab_merges(path / "vocab.json", path / "merges.txt"))
            else:
                raise UserError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this folder")
        if not path.exists():
            raise UserError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # the Rust library raises plain Exception with a parse message
            raise UserError(f"{path}: not a valid tokenizer.json ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def to_str(self) -> str:
        return self.inner.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

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


def train_bpe(texts: Iterator[str] | Iterable[str], vocab_size: int, *, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (the 256 bytes, merges, and <|endoftext|>)."""
    tok = byte_level_bpe()
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
