"""Tokenizers named as in GPT-NeoX configs (`tokenizer_type`, `vocab_file`).

Only `HFTokenizer` (a Hugging Face `tokenizers` JSON file) is supported; it covers the GPT-NeoX-20B /
StableLM tokenizer and the ones `tools/train_tokenizer.py` writes.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from neox_fork.errors import UserError

SUPPORTED_TOKENIZER_TYPES = ("HFTokenizer",)

# Tried in order when a tokenizer has no `<|endoftext|>`: the usual end-of-sequence spellings.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library.

    `vocab_size` is the real number of ids (added tokens included), not the padded embedding size;
    `eod` is the id appended after each document.
    """

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer

        self.vocab_file = str(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise UserError(f"vocab-file {self.vocab_file}: no such file (expected a tokenizer.json)")
        try:
            self._tokenizer = Tokenizer.from_file(self.vocab_file)
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"vocab-file {self.vocab_file}: not a valid Hugging Face tokenizer.json ({first_line})"
            ) from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        for token in _EOD_CANDIDATES:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        specials = sorted(
            token_id
            for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
            if added.special
        )
        if specials:
            return specials[0]
        raise UserError(
            f"vocab-file {self.vocab_file}: has no <|endoftext|>, EOS or other special token "
            "to mark the end of a document"
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.vocab_file!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(tokenizer_type: str, vocab_file: str) -> HFTokenizer:
    """Load the tokenizer a NeoX config names; bad type or file raise `UserError`."""
    if tokenizer_type not in SUPPORTED_TOKENIZER_TYPES:
        raise UserError(
            f"tokenizer-type {tokenizer_type!r} is not supported; valid: {', '.join(SUPPORTED_TOKENIZER_TYPES)}"
        )
    if not vocab_file:
        raise UserError(f"vocab-file must be set to a tokenizer.json for tokenizer-type {tokenizer_type}")
    return HFTokenizer(vocab_file)


def tokenizer_file_vocab_size(vocab_file: str | None) -> int | None:
    """The ids of the tokenizer file a config names, None when it names no file that exists: sizing a
    model (model summary, benchmarks) must work before the tokenizer is there."""
    if vocab_file and os.path.isfile(vocab_file):
        return HFTokenizer(vocab_file).vocab_size
    return None


EOD_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_path: str) -> HFTokenizer:
    """Train a byte-level BPE tokenizer like GPT-NeoX's (`<|endoftext|>` is id 0) and write its
    tokenizer.json atomically (temporary file, then rename)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    min_size = 256 + 1  # every byte plus <|endoftext|>
    if vocab_size < min_size:
        raise UserError(f"--vocab-size {vocab_size}: must be at least {min_size} (256 bytes + {EOD_TOKEN})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    output_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(output_dir, exist_ok=True)
    from neox_fork.checkpoint import atomic_path

    with atomic_path(output_path) as temp_path:
        tokenizer.save(str(temp_path))
    return HFTokenizer(output_path)


def train_tokenizer_from_files(
    inputs: Sequence[str], output_dir: str, vocab_size: int, jsonl_key: str = "text"
) -> tuple[HFTokenizer, int]:
    """Train on files read as preprocessing reads them; returns the tokenizer and the count of
    malformed records skipped. Writes OUTPUT_DIR/tokenizer.json."""
    from neox_fork.data.readers import BadRecord, expand_inputs, iter_records, parse_record

    files = expand_inputs(inputs)
    counts = {"documents": 0, "bad": 0}

    def texts() -> Iterable[str]:
        for record in iter_records(files):
            try:
                (text,) = parse_record(record, [jsonl_key])
            except BadRecord:
                counts["bad"] += 1
                continue
            counts["documents"] += 1
            yield text

    tokenizer = train_bpe_tokenizer(texts(), vocab_size, os.path.join(output_dir, "tokenizer.json"))
    if counts["documents"] == 0:
        os.unlink(tokenizer.vocab_file)
        raise UserError(f"--input {' '.join(inputs)}: no documents to train on")
    return tokenizer, counts["bad"]
