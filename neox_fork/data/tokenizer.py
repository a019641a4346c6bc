"""Tokenizers named as in GPT-NeoX configs (`tokenizer_type`, `vocab_file`, `merge_file`), with upstream's ids.

    GPT2BPETokenizer    vocab_file = GPT-2 vocab.json, merge_file = merges.txt (upstream's default type)
    HFGPT2Tokenizer     vocab_file = a local folder transformers' GPT2TokenizerFast loads; `<|padding|>` is added
    SPMTokenizer        vocab_file = a sentencepiece .model; eod is the piece `<|endoftext|>`
    CharLevelTokenizer  no file: UTF-8 bytes as ids, 512 ids, eod 0
    TiktokenTokenizer   vocab_file = a local .tiktoken BPE file (upstream names an encoding it downloads)
    HFTokenizer         vocab_file = a Hugging Face tokenizer.json

Each has `encode`, `encode_batch`, `decode`, `eod` and `vocab_size` (the real number of ids, before the
embedding's padding). `TokenizerSource` names a tokenizer's type and files, so a checkpoint can carry them
and the Hugging Face export can rebuild the same ids (see tokenizer_export.py).

An HFTokenizer whose tokenizer.json lies in a transformers tokenizer folder with a chat template (the
`--tokenizer-path` folder chat preprocessing read, as upstream's post-training configs name it) carries that
folder's chat files too (`chat_files`): a checkpoint copies them beside its tokenizer.json, so the export and
`generate.py --chat` apply the template the data was made with, wherever that folder has gone since.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from neox_fork.checkpoint.atomic import atomic_path
from neox_fork.config.rules import CHOICES
from neox_fork.errors import UserError

TOKENIZER_TYPES = CHOICES["tokenizer_type"]  # upstream's six, listed once with the other config values
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"  # what upstream's HFGPT2Tokenizer adds
CHAR_VOCAB_SIZE = 512  # upstream's CharLevelTokenizer

# Tried in order when a tokenizer.json has no `<|endoftext|>`: the usual end-of-sequence spellings.
# The files of a transformers tokenizer folder that carry its chat template and special tokens.
CHAT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[SEP]")


def canonical_type(tokenizer_type: str) -> str:
    """Upstream matches tokenizer_type case-insensitively; the spelling of TOKENIZER_TYPES, or UserError."""
    for name in TOKENIZER_TYPES:
        if str(tokenizer_type).lower() == name.lower():
            return name
    raise UserError(f"tokenizer-type {tokenizer_type!r} is not supported; valid: {', '.join(TOKENIZER_TYPES)}")


def _need_file(path: str | None, flag: str, what: str, tokenizer_type: str) -> str:
    if not path:
        raise UserError(f"{flag} must be set to {what} for tokenizer-type {tokenizer_type}")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file (expected {what})")
    return str(path)


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library.

    `vocab_size` is the real number of ids (added tokens included), not the padded embedding size;
    `eod` is the id appended after each document.
    """

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer

        self.vocab_file = _need_file(vocab_file, "vocab-file", "a tokenizer.json", "HFTokenizer")
        try:
            self._tokenizer = Tokenizer.from_file(self.vocab_file)
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            raise UserError(
                f"vocab-file {self.vocab_file}: not a valid Hugging Face tokenizer.json ({_first_line(err)})"
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
        return f"{type(self).__name__}({self.vocab_file!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's byte-level BPE from vocab.json + merges.txt: the ids of transformers' GPT2Tokenizer, which
    upstream uses; `<|endoftext|>` (which must be in vocab.json) is the eod and is matched as one token."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        kind = "GPT2BPETokenizer"
        self.vocab_file = _need_file(vocab_file, "vocab-file", "a GPT-2 vocab.json", kind)
        self.merge_file = _need_file(merge_file, "merge-file", "a GPT-2 merges.txt", kind)
        try:
            bpe = models.BPE.from_file(self.vocab_file, self.merge_file)
        except Exception as err:
            raise UserError(f"vocab-file {self.vocab_file} / merge-file {self.merge_file}: not a GPT-2 vocab.json "
                            f"and merges.txt ({_first_line(err)})") from None
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=False)
        eod = self._tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise UserError(f"vocab-file {self.vocab_file}: has no {EOD_TOKEN} (GPT2BPETokenizer's end of document)")
        self._tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
        self.eod = eod


class HFGPT2Tokenizer:
    """transformers' GPT2TokenizerFast from a local folder, with `<|padding|>` added as upstream does (so the
    vocabulary is one larger unless the folder has it); eod is its eos token. Upstream loads the hub's `gpt2`
    when vocab_file is unset; nothing downloads here, so the folder is required."""

    def __init__(self, vocab_file: str | None):
        from transformers import GPT2TokenizerFast

        if not vocab_file:
            raise UserError("vocab-file must be set to a local folder with GPT-2 tokenizer files for tokenizer-type "
                            "HFGPT2Tokenizer (upstream downloads 'gpt2' from the hub; nothing downloads here)")
        if not os.path.isdir(vocab_file):
            raise UserError(f"vocab-file {vocab_file}: no such folder (expected a folder with GPT-2 tokenizer files: "
                            "vocab.json + merges.txt or tokenizer.json)")
        self.vocab_file = str(vocab_file)
        try:
            self.hf = GPT2TokenizerFast.from_pretrained(self.vocab_file, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad folder
            raise UserError(f"vocab-file {vocab_file}: not a GPT-2 tokenizer folder ({_first_line(err)})") from None
        self.hf.add_special_tokens({"pad_token": PAD_TOKEN})
        if self.hf.eos_token_id is None:
            raise UserError(f"vocab-file {vocab_file}: the tokenizer has no eos token to end documents with")
        self.eod = self.hf.eos_token_id
        self.pad = self.hf.pad_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))


class SPMTokenizer:
    """A sentencepiece model; eod is the piece `<|endoftext|>` as upstream reads it (sentencepiece answers
    the unknown piece's id when the model has none)."""

    def __init__(self, vocab_file: str):
        import sentencepiece as spm

        self.vocab_file = _need_file(vocab_file, "vocab-file", "a sentencepiece .model file", "SPMTokenizer")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        except Exception as err:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError for a bad file
            raise UserError(f"vocab-file {vocab_file}: not a sentencepiece model ({_first_line(err)})") from None
        self.eod = self.sp.piece_to_id(EOD_TOKEN)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


class CharLevelTokenizer:
    """Upstream's character-level tokenizer: a text's UTF-8 bytes are its ids, 512 ids, eod 0, pad 1; each
    id decodes to chr(id) clamped to [32, 512]."""

    vocab_file = ""

    def __init__(self):
        self.vocab_size = CHAR_VOCAB_SIZE
        self.eod = 0
        self.pad = 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(max(32, min(int(i), self.vocab_size))) for i in ids)


# tiktoken's encodings whose constructor reads one .tiktoken file (gpt2's reads two other files)
_LOCAL_READABLE_ENCODINGS = ("r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base")


def tiktoken_encoding(vocab_file: str):
    """A tiktoken Encoding from a local .tiktoken file. A file named for one of tiktoken's encodings
    (`cl100k_base.tiktoken`, ...) gets that encoding's split pattern and special tokens, and must be that
    encoding's file (its published hash is checked); any other file gets cl100k_base's pattern and
    `<|endoftext|>` as the id after its ranks."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    name = Path(vocab_file).name.removesuffix(".tiktoken")
    try:
        import tiktoken_ext.openai_public as public

        if name in _LOCAL_READABLE_ENCODINGS:
            constructor = public.ENCODING_CONSTRUCTORS[name]
            # the constructor names its download; read the local file in its place, hash still checked
            real_loader = public.load_tiktoken_bpe
            public.load_tiktoken_bpe = lambda _url, expected_hash=None: load_tiktoken_bpe(vocab_file, expected_hash)
            try:
                return tiktoken.Encoding(**constructor())
            finally:
                public.load_tiktoken_bpe = real_loader
        ranks = load_tiktoken_bpe(vocab_file)
        return tiktoken.Encoding(name=name, pat_str=_cl100k_pattern(), mergeable_ranks=ranks,
                                 special_tokens={EOD_TOKEN: len(ranks)})
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - tiktoken raises ValueError/binascii errors for a bad file
        raise UserError(f"vocab-file {vocab_file}: not a usable .tiktoken BPE file ({_first_line(err)})") from None


def _cl100k_pattern() -> str:
    import tiktoken_ext.openai_public as public

    real_loader = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *_a, **_k: {}
    try:
        return public.cl100k_base()["pat_str"]
    finally:
        public.load_tiktoken_bpe = real_loader


class TiktokenTokenizer:
    """tiktoken's BPE from a local .tiktoken file (see tiktoken_encoding); eod is its end-of-text token.
    Special-token text is encoded as the special token (upstream's batch path; its one-text path refuses it)."""

    def __init__(self, vocab_file: str):
        self.vocab_file = _need_file(vocab_file, "vocab-file", "a local .tiktoken BPE file (upstream's encoding "
                                     "names download; nothing downloads here)", "TiktokenTokenizer")
        self.encoding = tiktoken_encoding(self.vocab_file)
        self.eod = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")


Tokenizer = HFTokenizer | GPT2BPETokenizer | HFGPT2Tokenizer | SPMTokenizer | CharLevelTokenizer | TiktokenTokenizer


def build_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None) -> Tokenizer:
    """Load the tokenizer a NeoX config names; bad type or files raise `UserError`."""
    kind = canonical_type(tokenizer_type)
    if kind == "GPT2BPETokenizer":
        if vocab_file and not merge_file and str(vocab_file).endswith("tokenizer.json"):
            raise UserError(f"merge-file must be set for tokenizer-type GPT2BPETokenizer (upstream's default); for a "
                            f"tokenizer.json like {vocab_file} set tokenizer-type HFTokenizer")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if kind == "CharLevelTokenizer":
        return CharLevelTokenizer()
    return {"HFGPT2Tokenizer": HFGPT2Tokenizer, "SPMTokenizer": SPMTokenizer, "TiktokenTokenizer": TiktokenTokenizer,
            "HFTokenizer": HFTokenizer}[kind](vocab_file)


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer's type and files: what a config names, or what a checkpoint carries."""

    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None

    @classmethod
    def of_config(cls, config) -> "TokenizerSource":
        return cls(canonical_type(config.tokenizer_type), config.vocab_file, getattr(config, "merge_file", None))

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file)

    def saved_names(self) -> dict[str, str]:
        """{"vocab_file"/"merge_file": the name a copy of that file or folder gets in a checkpoint folder}."""
        kind = self.tokenizer_type
        if kind == "CharLevelTokenizer":
            return {}
        if kind == "GPT2BPETokenizer":
            return {"vocab_file": "vocab.json", "merge_file": "merges.txt"}
        if kind == "TiktokenTokenizer":  # the name picks the encoding's pattern (tiktoken_encoding)
            return {"vocab_file": Path(self.vocab_file or "tokenizer.tiktoken").name}
        return {"vocab_file": {"HFTokenizer": "tokenizer.json", "SPMTokenizer": "tokenizer.model",
                               "HFGPT2Tokenizer": "hf_gpt2_tokenizer"}[kind]}

    def exists(self) -> bool:
        """Whether every file this tokenizer needs is there (CharLevelTokenizer needs none)."""
        return all(getattr(self, key) and os.path.exists(getattr(self, key)) for key in self.saved_names())

    def chat_files(self) -> list[Path]:
        """The transformers files beside an HFTokenizer's tokenizer.json when that folder has a chat template
        (chat_template.jinja, or chat_template in tokenizer_config.json); [] otherwise."""
        if self.tokenizer_type != "HFTokenizer" or not self.vocab_file:
            return []
        folder = Path(self.vocab_file).parent
        return [folder / name for name in CHAT_FILES if (folder / name).is_file()] if has_chat_template(folder) else []

    def in_folder(self, folder: str | os.PathLike) -> "TokenizerSource":
        """The same tokenizer read from copies saved in `folder` under saved_names()."""
        return TokenizerSource(self.tokenizer_type, **{key: str(Path(folder) / name)
                                                        for key, name in self.saved_names().items()})


def has_chat_template(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a transformers tokenizer folder with a chat template."""
    import json

    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "tokenizer_config.json").is_file()
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_file_vocab_size(vocab_file: str | None, tokenizer_type: str = "HFTokenizer",
                              merge_file: str | None = None) -> int | None:
    """The ids of the tokenizer a config names, None when its files are not there: sizing a model (model
    summary, benchmarks) must work before the tokenizer is there."""
    source = TokenizerSource(canonical_type(tokenizer_type), vocab_file, merge_file)
    if source.exists():
        return source.build().vocab_size
    return None


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
